"""The report of ``scripts/bench_e2e.py``: the explanation of each mode's end-to-end difference by
its attention calls' own times, and the markdown file."""

from __future__ import annotations

from pathlib import Path


def explain_mode(mode, variants, problems):
    """The explanation fields: attention sums from the per-problem times, the rest, and the diff."""
    plain, disp = variants.get("plain", {}), variants.get("dispatcher", {})
    out = {"plain_ms": plain.get("median_ms"), "dispatcher_ms": disp.get("median_ms")}
    if out["plain_ms"] and out["dispatcher_ms"]:
        out["speedup"] = out["plain_ms"] / out["dispatcher_ms"]
        out["e2e_diff_ms"] = out["plain_ms"] - out["dispatcher_ms"]
    source = "eager_ms"
    if mode == "compile" and problems and all(len(p.get("compiled_ms", {})) == 2 for p in problems):
        source = "compiled_ms"
    if problems and all(len(p.get(source, {})) == 2 for p in problems):
        out["per_call_times_from"] = source
        out["attention_ms_sdpa"] = sum(p["count"] * p[source]["sdpa"] for p in problems)
        out["attention_ms_dispatcher"] = sum(p["count"] * p[source]["dispatcher"] for p in problems)
        out["attention_diff_ms"] = out["attention_ms_sdpa"] - out["attention_ms_dispatcher"]
        if out["plain_ms"] is not None:
            out["non_attention_ms_plain"] = out["plain_ms"] - out["attention_ms_sdpa"]
        if out["dispatcher_ms"] is not None:
            out["non_attention_ms_dispatcher"] = out["dispatcher_ms"] - out["attention_ms_dispatcher"]
        if "e2e_diff_ms" in out:
            out["unexplained_diff_ms"] = out["e2e_diff_ms"] - out["attention_diff_ms"]
    for name, r in (("plain", plain), ("dispatcher", disp)):
        prof = r.get("profile")
        if prof:
            out[f"profile_kernel_ms_{name}"] = prof["kernel_ms_per_forward"]
            out[f"profile_attention_kernel_ms_{name}"] = prof["attention_kernel_ms_per_forward"]
            out[f"profile_kernel_launches_{name}"] = prof["kernel_launches_per_forward"]
            out[f"profile_cpu_ops_self_ms_{name}"] = prof["cpu_ops_self_ms_per_forward"]
        if r.get("median_host_ms") is not None:
            out[f"host_ms_{name}"] = r["median_host_ms"]
    return out


def fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def write_markdown(result, path: Path):
    env = result["environment"]
    lines = [f"# End to end: diffusers models with and without the dispatcher ({env['device']})", "",
             f"{env['date']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['dtype']}, "
             f"{result['settings']['iters']} timed forwards per variant (median), warm-up excluded."
             + (" **Smoke test with tiny configs (--small): not a benchmark.**" if result["settings"]["small"] else ""), "",
             "ms per forward. `attention (sdpa / disp)`: sum over the forward's attention calls of count x that problem's "
             "own time (eager, or compiled in compile mode). `unexplained`: the end-to-end difference minus the attention "
             "difference.", "",
             "| model | mode | plain | dispatcher | speedup | attention sdpa | attention disp | non-attention plain | "
             "non-attention disp | unexplained | host plain | host disp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    loop = result.get("resolution_loop")
    if loop:
        lines += ["", f"6-resolution loop (default torch.compile, tokens {loop['tokens']}, two forwards each): "
                  + "; ".join(f"{v}: {loop[v]['compiles']} compiles, {loop[v]['graph_runs']} compiled-graph runs, "
                              f"{loop[v]['tunings']} tunings" for v in ("plain", "dispatcher") if v in loop), ""]
        if "plain" in loop and "dispatcher" in loop:
            lines += ["| tokens | plain ms | dispatcher ms | plain / dispatcher | run-time operator calls |", "|---|---|---|---|---|"]
            for a, b in zip(loop["plain"]["per_resolution"], loop["dispatcher"]["per_resolution"]):
                if "median_ms" in a and "median_ms" in b:
                    lines.append(f"| {a['tokens']} | {a['median_ms']:.3f} | {b['median_ms']:.3f} | "
                                 f"{a['median_ms'] / b['median_ms']:.3f} | {b['runtime_dispatch_calls']} |")
            lines.append("")
    for m in result["models"]:
        for mode, e in m.get("explanation", {}).items():
            lines.append(f"| {m['name']} | {mode} | {fmt(e.get('plain_ms'))} | {fmt(e.get('dispatcher_ms'))} | "
                         f"{fmt(e.get('speedup'))} | {fmt(e.get('attention_ms_sdpa'))} | {fmt(e.get('attention_ms_dispatcher'))} | "
                         f"{fmt(e.get('non_attention_ms_plain'))} | {fmt(e.get('non_attention_ms_dispatcher'))} | "
                         f"{fmt(e.get('unexplained_diff_ms'))} | {fmt(e.get('host_ms_plain'))} | {fmt(e.get('host_ms_dispatcher'))} |")
    for m in result["models"]:
        lines += ["", f"## {m['name']}: {m.get('description', {}).get('class', '')}", ""]
        if "error" in m:
            lines += [f"Error: `{m['error']}`", ""]
        lines.append(f"{m.get('attention_calls', '-')} attention calls per forward.")
        for mode, variants in m.get("modes", {}).items():
            for variant, r in variants.items():
                if "error" in r:
                    lines.append(f"- {mode} {variant}: **error** `{r['error'][:300]}`")
                else:
                    dyn = r.get("dynamo")
                    extra = f", {dyn['unique_graphs']} graphs, {dyn['graph_breaks']} graph breaks" if dyn else ""
                    lines.append(f"- {mode} {variant}: first call {r['first_call_s']:.2f} s{extra}, "
                                 f"output rel-L1 vs eager plain {r['output_rel_l1_vs_eager_plain']:.2e}")
        lines += ["", "| problem (b, heads, s_q x s_kv, d) | calls | decision | eager sdpa | eager disp | compiled sdpa | compiled disp |",
                  "|---|---|---|---|---|---|---|"]
        for p in m.get("problems", []):
            e, c, d = p.get("eager_ms", {}), p.get("compiled_ms", {}), p.get("decision", {})
            lines.append(f"| {p['summary']} | {p['count']} | {d.get('backend', d.get('error', '-'))} | {fmt(e.get('sdpa'), 4)} | "
                         f"{fmt(e.get('dispatcher'), 4)} | {fmt(c.get('sdpa'), 4)} | {fmt(c.get('dispatcher'), 4)} |")
        for mode, variants in m.get("modes", {}).items():
            for variant, r in variants.items():
                prof = r.get("profile")
                if not prof:
                    continue
                lines += ["", f"Profile, {mode} {variant}, per forward: kernels {fmt(prof['kernel_ms_per_forward'])} ms "
                          f"({fmt(prof['kernel_launches_per_forward'], 0)} launches), attention kernels "
                          f"{fmt(prof['attention_kernel_ms_per_forward'])} ms, operators' self CPU time "
                          f"{fmt(prof['cpu_ops_self_ms_per_forward'])} ms", "",
                          "| kernel / operator | calls | self device ms | self CPU ms |", "|---|---|---|---|"]
                for row in prof["top_kernels"] + prof["top_cpu_ops"][:8]:
                    name = row["name"].replace("|", "\\|").replace("`", "'")
                    lines.append(f"| `{name[:100]}` | {row['count_per_forward']:g} | {row['self_device_ms_per_forward']:.3f} | "
                                 f"{row['self_cpu_ms_per_forward']:.3f} |")
    path.write_text("\n".join(lines) + "\n")
