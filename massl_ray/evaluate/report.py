"""The evaluation's report: one headline line (the screen) and the markdown summary
(``eval.md``), rendered from the ``eval.json`` record. Ray-free."""

from __future__ import annotations

from typing import Optional


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def headline(r: dict) -> str:
    """One line: the main number of each evaluation that ran."""
    parts = []
    if r.get("knn") is not None:
        parts.append(f"k-NN top-1 (k={r['knn_k']}): {r['knn_top1']:.2f}%")
        parts.append("linear top-1: " + ("-" if r["linear_top1"] is None
                                         else f"{r['linear_top1']:.2f}%"))
    if r.get("low_shot"):
        parts.append("low-shot " + ", ".join(f"{k}: {_fmt(v['mean'])}"
                                             for k, v in r["low_shot"].items()))
    if r.get("finetune"):
        parts.append(f"fine-tune top-1: {r['finetune']['finetune_top1']:.2f}%")
    if r.get("retrieval"):
        parts.append(f"retrieval mAP: {r['retrieval']['map']:.2f}")
    for name, v in (r.get("revisited") or {}).items():
        parts.append(f"{name} mAP M/H: {_fmt(v['medium']['map'])}/{_fmt(v['hard']['map'])}")
    return " | ".join(parts)


def _knn(r: dict, st: dict) -> list[str]:
    lines = [f"Teacher backbone [CLS] features at {r['image_size']} px (resize + centre crop); "
             f"train {r['train']['rows']} images ({r['train']['skipped']} undecodable skipped) "
             f"from `{r['train']['source']}`, test {r['test']['rows']} images "
             f"({r['test']['skipped']} skipped) from `{r['test']['source']}`, "
             f"{r['num_classes']} classes.", "",
             "## k-NN (cosine, votes weighted by exp(sim / 0.07))", "", "| k | top-1 | top-5 |",
             "|---|---|---|"]
    return lines + [f"| {k} | {_fmt(r['knn'].get(f'knn_top1_k{k}'))} | "
                    f"{_fmt(r['knn'].get(f'knn_top5_k{k}'))} |" for k in st["ks"]]


def _linear(li: dict, st: dict) -> list[str]:
    return ["", f"## Linear probe ({li['linear_epochs']} epochs, SGD + cosine, features of the "
                f"last {st['linear_blocks']} block(s), dim {li['linear_feature_dim']})", "",
            f"Best top-1 **{_fmt(li['linear_top1'])}** (top-5 {_fmt(li['linear_top5'])}) "
            f"at lr {li['linear_best_lr']}; per lr: "
            + ", ".join(f"{k}: {v:.2f}" for k, v in li["linear_per_lr"].items())]


def _skipped(v: dict) -> str:
    return f" skipped: {v['skipped']}" if v.get("skipped") else ""


def _few_shot(fs: dict, st: dict) -> list[str]:
    return ["", f"## Few-shot (logistic regression, {st['few_shot_draws']} draws, "
                f"seed {st['seed']})", "", "| shots / class | top-1 mean | std |", "|---|---|---|"
            ] + [f"| {n} | {_fmt(v['mean'])} | {_fmt(v['std'])} |" + _skipped(v)
                 for n, v in fs.items()]


def _low_shot(ls: dict, st: dict) -> list[str]:
    return ["", f"## Low-shot (logistic regression on frozen features, C = {st['low_shot_c']}, "
                f"{st['low_shot_draws']} seeded splits, seed {st['seed']})",
            "", "| labels | labeled rows | top-1 mean | std |", "|---|---|---|---|"
            ] + [f"| {n} | {v['train_rows'] if v['train_rows'] is not None else '-'} | "
                 f"{_fmt(v['mean'])} | {_fmt(v['std'])} |" + _skipped(v) for n, v in ls.items()]


def _finetune(ft: dict, st: dict) -> list[str]:
    return ["", f"## Fine-tuning ({ft['finetune_epochs']} epochs, AdamW, lr {ft['finetune_lr']} "
                f"x batch / 256, layer decay {ft['finetune_layer_decay']}, warmup "
                f"{ft['finetune_warmup_epochs']} epoch(s) + cosine, {ft['finetune_train_rows']} "
                f"train images)", "",
            f"Top-1 **{ft['finetune_top1']:.2f}**; per epoch: "
            + ", ".join(f"{a:.2f}" for a in ft["finetune_top1_per_epoch"])]


def _retrieval(rt: dict, st: dict) -> list[str]:
    return ["", "## Class-level retrieval (test queries against the train images, cosine)", "",
            f"mAP **{rt['map']:.2f}** over {rt['queries']} queries; "
            + ", ".join(f"P@{k} {v:.2f}" for k, v in rt["precision_at"].items())]


def _revisited(name: str, v: dict, ks: list) -> list[str]:
    lines = ["", f"## Revisited {name} ({v['database']} images, {v['num_queries']} queries, "
                 f"longer side <= {v['imsize']} px, scales "
                 f"{', '.join(f'{x:.3f}' for x in v['scales'])})", "",
             "| setting | mAP | " + " | ".join(f"mP@{k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for setting in ("easy", "medium", "hard"):
        m = v[setting]
        mp = m["mp_at"] or {}
        lines.append(f"| {setting} | {_fmt(m['map'])} | "
                     + " | ".join(_fmt(mp.get(str(k))) for k in ks) + " |")
    return lines


def _times(t: dict) -> list[str]:
    def feat_time(name: str) -> str:
        i = t[f"features_{name}"]
        if i["cached"]:
            return f"{name} from the cache"
        return (f"{name} {i['rows']} images {i['seconds']:.1f}s ({i['images_per_s']:.0f} img/s, "
                f"{i['mode']})")

    lines = ["", "## Time", ""]
    if "features_train" in t:
        pipe = t["features_train"].get("pipeline_s") or t["features_test"].get("pipeline_s")
        lines.append(f"- features: {feat_time('train')}; {feat_time('test')}"
                     + (f" (one Ray Data pipeline, {pipe:.1f}s)" if pipe else ""))
    stages = [("k-NN", "knn_s"), ("linear", "linear_s"), ("few-shot", "few_shot_s"),
              ("low-shot", "low_shot_s"), ("fine-tune", "finetune_s"), ("retrieval", "retrieval_s"),
              ("revisited (features + metrics)", "revisited_s")]
    return lines + ["- " + "; ".join(f"{n} {t[k]:.1f}s" for n, k in stages if k in t)
                    + f"; total {t['total_s']:.1f}s", ""]


#: The sections after the k-NN table, in order: the result key and its renderer.
SECTIONS = (("linear", _linear), ("few_shot", _few_shot), ("low_shot", _low_shot),
            ("finetune", _finetune), ("retrieval", _retrieval))


def summary_markdown(r: dict) -> str:
    st = r["settings"]
    step = "" if r["global_step"] is None else f" (step {r['global_step']})"
    lines = [f"# Evaluation of `{r['checkpoint']}`{step}", ""]
    if r["knn"] is not None:
        lines += _knn(r, st)
    for key, render in SECTIONS:
        if r.get(key):
            lines += render(r[key], st)
    for name, v in (r["revisited"] or {}).items():
        lines += _revisited(name, v, st["retrieval_ks"])
    return "\n".join(lines + _times(r["timings"]))
