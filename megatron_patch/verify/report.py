"""The comparison report: a text table (one row per hook point, then `Overall Result`), JSON, a PNG plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

RULE = "============="


def _layer(value) -> str:
    return "-" if value is None else str(value)


def _num(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3e}"


def format_report(report: dict, debug: bool = False, written: list | None = None) -> str:
    lay = report["layout"]
    model = report["model"]
    tol = report["tolerances"]
    lines = [
        f"{RULE} Megatron vs HuggingFace activations {RULE}",
        f"model     : {report['family']} ({report['hf_path']}): {model['num_layers']} layers, hidden "
        f"{model['hidden_size']}" + (f", {model['num_experts']} experts" if model["num_experts"] else "")
        + (f" ({model['experts']})" if model.get("experts") else "")
        + (f"; {model['transformer_impl']} spec" if model.get("transformer_impl") else ""),
        f"weights   : {report['weights']}",
        f"layout    : {lay['name']} on {lay['world_size']} rank(s)",
        f"input     : batch {report['batch_size']} x seq {report['seq_length']} random tokens (seed {report['seed']})",
        f"dtype     : {report['dtype']} (HF {report['dtypes']['hf']}, Megatron {report['dtypes']['megatron']}, "
        f"router {report['dtypes']['router']})",
        f"tolerance : {_describe_tol(tol)}",
        "",
        f"{RULE} Testing Results {RULE}",
        f"{'component':<20}{'layer':>6}{'max diff':>13}{'mean diff':>13}{'cos':>11}"
        + (f"{'max|HF|':>11}{'bound':>11}" if debug else "") + "  result",
    ]
    for row in report["rows"]:
        note = f"  ({row['note']})" if row.get("note") else ""
        extra = f"{row['ref_max_abs']:>11.3e}{row.get('bound', float('nan')):>11.3e}" if debug else ""
        verdict = "PASS" if row["passed"] else "FAIL"
        lines.append(f"{row['component']:<20}{_layer(row['layer']):>6}{_num(row['max_abs']):>13}"
                     f"{_num(row['mean_abs']):>13}{row['cos']:>11.6f}{extra}  {verdict}{note}")
    lines.append("")
    if report.get("logits"):
        lg = report["logits"]
        lines.append(f"Logits: max diff {_num(lg['max_abs'])}, mean diff {_num(lg['mean_abs'])}, "
                     f"top-1 agreement {lg['top1_agreement']:.2%}")
    first = report.get("first_failure")
    if first:
        where = "" if first["layer"] is None else f"layer {first['layer']} "
        lines.append(f"First mismatch: {where}{first['component']} (max diff {_num(first['max_abs'])}); "
                     "everything before it matches")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    if debug and report.get("timings_s"):
        lines.append("timings (rank 0, s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))
    for path in written or []:
        lines.append(f"wrote {path}")
    lines += [f"{RULE} Overall Result {RULE}", report["result"]]
    return "\n".join(lines)


def _describe_tol(tol: dict) -> str:
    router = ("same experts for every token" if not tol["router_mismatch"] else
              f"other experts for <= {tol['router_mismatch']:.0%} of tokens")
    return f"{tol['metric']} |diff| <= {tol['atol']:g} x max(1, max |HF|); router: {router}"


def _clean(value):
    """JSON without NaN/Infinity (strict parsers reject them): non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json_dict(report: dict) -> dict:
    out = dict(report)
    # the field names the report promises: component, layer, max_abs, mean_abs, cos, pass
    out["rows"] = [{**{k: v for k, v in r.items() if k != "passed"}, "pass": bool(r["passed"])}
                   for r in report["rows"]]
    return _clean(out)


def write_json(report: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json_dict(report), indent=2) + "\n")


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        from megatron_patch.errors import UserError

        raise UserError("--plot needs matplotlib (pip install 'megatron-patch[viz]')") from None
    return matplotlib


def write_plot(report: dict, path) -> None:
    """Max diff per layer, one line per component (log scale); embedding before layer 0, final norm and
    logits after the last layer; FAIL points circled in red."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = report["model"]["num_layers"]
    rows = report["rows"]
    pre, post = set(), set()
    seen_layer = False
    for r in rows:
        if r["layer"] is not None:
            seen_layer = True
        elif seen_layer:
            post.add(r["component"])
        else:
            pre.add(r["component"])

    def x_of(r):
        if r["layer"] is not None:
            return r["layer"]
        return -1 if r["component"] in pre else num_layers

    floor = 1e-12  # exact zeros on a log axis
    fig, ax = plt.subplots(figsize=(9, 5))
    components = list(dict.fromkeys(r["component"] for r in rows))
    for comp in components:
        pts = sorted((x_of(r), max(r["max_abs"] if math.isfinite(r["max_abs"]) else 1e3, floor), r["passed"])
                     for r in rows if r["component"] == comp)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        style = "-o" if len(pts) > 1 else "s"
        ax.plot(xs, ys, style, label=comp, markersize=4)
        bad = [(x, y) for x, y, ok in pts if not ok]
        if bad:
            ax.plot([b[0] for b in bad], [b[1] for b in bad], "o", markersize=11, markerfacecolor="none",
                    markeredgecolor="red")
    tol = report["tolerances"]
    if tol["metric"] == "max":
        ax.axhline(tol["atol"], color="grey", linestyle="--", linewidth=1,
                   label=f"tolerance {tol['atol']:g} (x max(1, max|HF|))")
    ax.set_yscale("log")
    ticks = [-1] + list(range(num_layers)) + [num_layers]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["emb"] + [str(i) for i in range(num_layers)] + ["out"])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max |megatron - HF|  (0 drawn at 1e-12)")
    ax.set_title(f"{report['family']} {report['layout']['name']} {report['dtype']}: {report['result']}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Seed 001's guide reads the comparison as sections of `PASS: <what> - Max diff: .., Avg diff: ..` lines.
# component -> (section, label); components not listed (norms, layer outputs) only appear with debug.
SEED_SECTIONS = ("Multi-Latent Attention (MLA)", "Mixture of Experts (MOE)", "Final Output")
_SEED_LABELS = {
    "indexer": (0, "DSA Indexer Top-k"),
    "attention": (0, "Attention Output"),
    "router": (1, "Router Output"),
    "shared_experts": (1, "Shared Experts Output"),
    "mlp": (1, "MOE Output"),
    "logits": (2, "Final Output"),
    "final_norm": (2, "Final Norm Output"),
}


def format_seed_sections(report: dict, debug: bool = False) -> str:
    """The report as seed 001's `test_mla_moe_correctness.py` prints it: one section per part of the model,
    then `Overall Result`. A dense layer's MLP row is labelled `Dense MLP Output` (it sits with the MoE rows)."""
    moe_layers = {r["layer"] for r in report["rows"] if r["component"] == "router"}
    sections: list[list[str]] = [[] for _ in SEED_SECTIONS]
    other: list[str] = []
    for row in report["rows"]:
        section, label = _SEED_LABELS.get(row["component"], (None, row["component"]))
        if row["component"] == "mlp" and report["model"]["num_experts"] and row["layer"] not in moe_layers:
            label = "Dense MLP Output"
        where = "" if row["layer"] is None or section == 2 else f"Layer {row['layer']} "
        note = f" ({row['note']})" if row.get("note") else ""
        line = (f"{'PASS' if row['passed'] else 'FAIL'}: {where}{label} - Max diff: {_num(row['max_abs'])}, "
                f"Avg diff: {_num(row['mean_abs'])}{note}")
        (sections[section] if section is not None else other).append(line)
    lines = [f"{RULE} Testing Results {RULE}"]
    for title, body in zip(SEED_SECTIONS, sections):
        if body:
            lines += [f"--- Checking {title} ---", *body, ""]
    if debug and other:
        lines += ["--- Other hook points ---", *other, ""]
    lines += [f"{RULE} Overall Result {RULE}", report["result"]]
    return "\n".join(lines)
