"""The `rewardscope` command line: demo, score images, export detectors, train a feedback reward, DPO pairs.
Every subcommand goes through the Scorer (or the exporter); nothing here knows model internals."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from rewardscope.models.profiles import DEFAULT_PROFILE, PROFILE_NAMES, get_profile
from rewardscope.models.registry import matching_variants


def sample_images() -> list[tuple[str, Path]]:
    """Real photos that ship with installed packages (ultralytics' assets): the demo's inputs."""
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    return [(name, assets / name) for name in ("bus.jpg", "zidane.jpg") if (assets / name).exists()]


DEMO_PROMPTS = ("four people and a bus", "a person", "two people", "a cat")


def _print_results(rows: list[tuple[str, str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rewardscope: detection matching score (embedded YOLOv3-tiny)")
    for column in ("image", "prompt", "matching", "detected", "error"):
        table.add_column(column)
    for image, prompt, result in rows:
        value = result.rewards.get("matching")
        objects = result.details.get("matching", {}).get("objects", [])
        detected = ", ".join(f"{o['detected']}/{o['requested']} {o['class']}" for o in objects)
        table.add_row(image, prompt, "-" if value is None else f"{value:.3f}", detected, result.error or "")
    Console().print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    from rewardscope.models.scorer import Scorer

    scorer = Scorer(["matching"], config={"matching": {"conf_threshold": args.conf}})
    pairs = [(name, path, prompt) for name, path in sample_images() for prompt in DEMO_PROMPTS]
    results = scorer.score([p for _, p, _ in pairs], [q for _, _, q in pairs])
    _print_results([(name, prompt, result) for (name, _, prompt), result in zip(pairs, results, strict=True)])
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    if len(args.paths) == 1 and Path(args.paths[0]).is_dir():
        return cmd_score_folder(args)

    if not args.prompt:
        print("scoring image files needs --prompt (once for all images, or once per image)", file=sys.stderr)
        return 2
    prompts = args.prompt * len(args.paths) if len(args.prompt) == 1 else args.prompt
    if len(prompts) != len(args.paths):
        print("give one --prompt for all images or one per image", file=sys.stderr)
        return 2
    weights = dict(_parse_weight(item) for item in args.rewards or ["matching"])
    scorer = build_scorer(weights, args.variant, args.profile or DEFAULT_PROFILE)
    for start in range(0, len(args.paths), args.batch_size):
        images = args.paths[start : start + args.batch_size]
        batch_prompts = prompts[start : start + args.batch_size]
        for path, prompt, result in zip(images, batch_prompts, scorer.score(images, batch_prompts), strict=True):
            print(json.dumps({"image": path, "prompt": prompt, **result.to_dict()}), flush=True)
    return 0


def build_scorer(weights: dict[str, float], variant: str | None = None, profile: str = DEFAULT_PROFILE) -> Any:
    """The Scorer `rewardscope score` uses: the service's reward config (env) and the profile, as HTTP resolves."""
    from rewardscope.models.scorer import Scorer

    return Scorer(weights, config=_reward_config(weights, variant), profile=profile)


def _reward_config(weights: dict[str, float], variant: str | None) -> dict[str, dict]:
    """What the service would pass for these rewards (REWARDSCOPE_CONFIG, REWARDSCOPE_DETECTOR), plus --variant."""
    from ..settings import ServiceSettings

    config = ServiceSettings.from_env().reward_config(list(weights))
    if variant and "matching" in weights:
        config["matching"] = {**config.get("matching", {}), "variant": variant}
    return config


LAYOUT_PROFILES = {"geneval": "geneval", "t2i-compbench": "t2i-compbench"}


def cmd_score_folder(args: argparse.Namespace) -> int:
    """Score a folder into --out (JSONL + Parquet + run.json), resumably; print the summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import folders

    root = Path(args.paths[0])
    layout, items = folders.folder_items(root, args.layout, Path(args.prompts) if args.prompts else None)
    default = ["geneval"] if layout == "geneval" else ["matching"]
    # A benchmark's folder is scored under that benchmark's own rules unless --profile says otherwise.
    profile = get_profile(args.profile or LAYOUT_PROFILES.get(layout, DEFAULT_PROFILE))
    weights = dict(_parse_weight(item) for item in args.rewards or default)
    out_dir = Path(args.out) if args.out else root.with_name(root.name + ".rewardscope")
    if args.server and args.engine == "ray":
        print("--server and --engine ray exclude each other: Ray actors load the models themselves", file=sys.stderr)
        return 2
    backend: folders.Backend | None = None
    if args.server:
        from rewardscope_client import RewardClient

        client = RewardClient(args.server, token=os.environ.get("REWARDSCOPE_TOKEN"), chunk_size=args.batch_size)
        backend = folders.ClientBackend(client, weights, profile.name)
    elif args.engine == "local":
        backend = folders.ScorerBackend(build_scorer(weights, args.variant, profile.name))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"))
    with Progress(*columns, TimeRemainingColumn(), disable=args.no_progress) as progress:
        task = progress.add_task(f"scoring {root.name} ({layout})", total=len(items), rate="")
        started = time.perf_counter()
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            progress.update(task, advance=count, rate=f"{done / (time.perf_counter() - started):.1f} img/s")

        if args.engine == "ray":
            config = _reward_config(weights, args.variant)
            stats = folders.score_items_ray(
                items,
                weights,
                config,
                out_dir,
                args.batch_size,
                args.ray_actors,
                args.ray_gpus,
                args.ray_address,
                on_batch=advance,
                profile=profile.name,
            )
        else:
            assert backend is not None
            stats = folders.score_items(items, backend, out_dir, args.batch_size, on_batch=advance, lanes=args.lanes)
        progress.update(task, completed=stats.skipped + stats.scored)
    rows = folders.read_rows(out_dir)
    versions = folders.versions_of(rows)
    config = {
        "root": str(root),
        "layout": layout,
        "rewards": weights,
        "profile": profile.label,
        "variant": args.variant,
        "server": args.server,
    }
    folders.write_run_config(out_dir, config, versions)
    folders.write_parquet(out_dir, rows)
    summary = folders.summarise(rows, "geneval" if "geneval" in weights else None, profile.label)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(folders.format_summary(summary))
    if args.report:
        from .report import write_report

        print(f"report: {write_report(rows, Path(args.report), versions)}")
    if stats.interrupted:
        print(f"interrupted: {len(rows)} of {len(items)} rows written; rerun to resume", file=sys.stderr)
        return 130
    return 0


def _parse_weight(item: str) -> tuple[str, float]:
    name, _, weight = item.partition("=")
    return name, float(weight) if weight else 1.0


def cmd_export_detector(args: argparse.Namespace) -> int:
    from rewardscope.models.detection.export import export_ultralytics

    names = None
    if args.names == "coco":
        from rewardscope.models.prompt import COCO_CLASSES

        names = list(COCO_CLASSES)
    elif args.names:
        names = [line.strip() for line in Path(args.names).read_text().splitlines() if line.strip()]
    path = export_ultralytics(args.model, args.output, imgsz=args.imgsz, batch=args.batch, names=names)
    print(path)
    return 0


# The train-reward options that are TrainConfig fields (argparse dests named as the fields).
TRAIN_OPTIONS = (
    "clip_model clip_processor hidden epochs batch_size learning_rate validation_fraction patience seed aux_weight "
    "aux_negatives device"
).split()


def cmd_train_reward(args: argparse.Namespace) -> int:
    from rewardscope.models.feedback import TrainConfig, train_feedback_reward
    from rich.console import Console
    from rich.table import Table

    config = TrainConfig(**{name: getattr(args, name) for name in TRAIN_OPTIONS})
    report = train_feedback_reward(args.labels, args.output, config, show_progress=not args.quiet)
    table = Table(title=f"feedback reward: {report.examples} pairs, best epoch {report.best_epoch}/{report.epochs_run}")
    for column in ("split", "pairs", "loss", "accuracy", "AUC"):
        table.add_column(column)
    for split, size, metrics in (
        ("train", report.train, report.train_metrics),
        ("validation", report.validation, report.validation_metrics),
    ):
        table.add_row(
            split,
            str(size),
            *(("-" if metrics[k] is None else f"{metrics[k]:.4f}") for k in ("loss", "accuracy", "auc")),
        )
    console = Console(stderr=True)
    console.print(table)
    console.print(f"saved to {args.output}; serve it with REWARDSCOPE_REWARDS=feedback:{Path(args.output).resolve()}")
    print(
        json.dumps({"output": str(args.output), "validation": report.validation_metrics, "train": report.train_metrics})
    )
    return 0


def cmd_dpo_pairs(args: argparse.Namespace) -> int:
    from rewardscope.models.scorer import Scorer
    from rewardscope.service.tools.dpo import export_dpo_pairs

    weights = dict(_parse_weight(item) for item in args.rewards)
    config = json.loads(args.config) if args.config else {}
    scorer = Scorer(
        weights, config={name: config.get(name, config.get(name.partition(":")[0], {})) for name in weights}
    )
    summary = export_dpo_pairs(
        args.folder,
        args.output,
        scorer,
        normalization=args.normalization,
        aggregation=args.aggregation,
        margin=args.margin,
        batch_size=args.batch_size,
    )
    for error in summary.errors:
        print(f"error: {error}", file=sys.stderr)
    print(
        json.dumps(
            {
                "output": str(args.output),
                "groups": summary.groups,
                "pairs": summary.pairs,
                "below_margin": summary.below_margin,
                "identical": summary.identical,
                "too_few_scored": summary.too_few_scored,
                "errors": len(summary.errors),
            }
        )
    )
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(host: str, port: int, allow_remote_without_token: bool = False) -> list[str]:
    """The bentoml command line that serves RewardService; refuses non-loopback hosts without a token."""
    if host not in LOOPBACK and not os.environ.get("REWARDSCOPE_TOKEN") and not allow_remote_without_token:
        raise SystemExit(
            f"refusing to listen on {host} without REWARDSCOPE_TOKEN set; "
            "set a token, or pass --allow-remote-without-token if the network is trusted"
        )
    bentoml = Path(sys.executable).with_name("bentoml")
    return [str(bentoml), "serve", "rewardscope.service.app:RewardService", "--host", host, "--port", str(port)]


def cmd_serve(args: argparse.Namespace) -> int:
    command = serve_command(args.host, args.port, args.allow_remote_without_token)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    print(f"rewardscope: serving on http://{args.host}:{args.port}  (try: curl http://{args.host}:{args.port}/rewards)")
    os.execv(command[0], command)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardscope", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP service (BentoML) on 127.0.0.1:3000")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    serve.add_argument("--allow-remote-without-token", action="store_true", help="listen beyond loopback with no auth")
    serve.set_defaults(run=cmd_serve)

    demo = commands.add_parser("demo", help="score the bundled sample photos with a few prompts")
    demo.add_argument("--conf", type=float, default=0.25, help="detection confidence threshold")
    demo.set_defaults(run=cmd_demo)

    score = commands.add_parser(
        "score", help="score a folder (resumable; JSONL + Parquet + summary) or image files (JSON lines)"
    )
    score.add_argument("paths", nargs="+", help="one folder, or image files")
    score.add_argument("--prompt", action="append", help="for image files: once for all, or once per image")
    score.add_argument("--rewards", nargs="+", help="names, optionally name=weight (default: matching; geneval)")
    score.add_argument("--variant", choices=tuple(matching_variants()), help="matching variant (/match's)")
    score.add_argument(
        "--profile",
        default=None,
        choices=PROFILE_NAMES,
        help=f"rules, as HTTP's profile (default: the benchmark's own for GenEval and T2I-CompBench folders, else "
        f"{DEFAULT_PROFILE}; docs/profiles.md)",
    )
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument(
        "--lanes", type=int, default=2, help="batches scored side by side, each on one core (1: one batch, all cores)"
    )
    score.add_argument("--layout", default="auto", choices=("auto", "flat", "geneval", "t2i-compbench"))
    score.add_argument("--prompts", help="flat folders: CSV/JSONL mapping file name -> prompt (and metadata)")
    score.add_argument("--out", help="results folder (default: <folder>.rewardscope beside it)")
    score.add_argument("--server", help="score through a running service at this URL instead of in-process")
    score.add_argument("--report", help="write a static HTML report into this folder")
    score.add_argument("--no-progress", action="store_true")
    score.add_argument("--engine", default="local", choices=("local", "ray"), help="ray: Ray Data actor pool")
    score.add_argument("--ray-actors", type=int, default=1, help="Scorer actors (each loads the models once)")
    score.add_argument("--ray-gpus", type=float, default=0, help="GPUs per actor")
    score.add_argument("--ray-address", help="existing Ray cluster ('auto' or ray://host:10001); default: local")
    score.set_defaults(run=cmd_score)

    export = commands.add_parser("export-detector", help="export an ultralytics model (.pt/.yaml) to ONNX")
    export.add_argument("model", help="yolo11n.pt, yolov8s.pt, a local .pt, or a .yaml for random init")
    export.add_argument("--output", help="target .onnx path (default: beside the current directory)")
    export.add_argument("--imgsz", type=int, default=640)
    export.add_argument("--batch", type=int, default=1, help="fixed batch size baked into the export")
    export.add_argument("--names", help="'coco' or a file with one class name per line (for .yaml models)")
    export.set_defaults(run=cmd_export_detector)

    train = commands.add_parser(
        "train-reward", help="train a feedback reward on (image, prompt, label 0/1) rows; serve as feedback:DIR"
    )
    train.add_argument("labels", help="JSONL or CSV with image, prompt, label (relative paths: beside the file)")
    train.add_argument("--output", required=True, help="directory for head.safetensors, config.json, report.json")
    train.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="hub id (local cache) or dir")
    train.add_argument("--clip-processor", default=None, help="processor hub id or dir (default: the model's)")
    train.add_argument("--hidden", type=int, default=256)
    train.add_argument("--epochs", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", dest="learning_rate", type=float, default=1e-3)
    train.add_argument(
        "--val-fraction", dest="validation_fraction", type=float, default=0.2, help="share of images held out (seeded)"
    )
    train.add_argument("--patience", type=int, default=20, help="early stopping: epochs without a better val loss")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--aux-weight", type=float, default=0.0, help="prompt-classification loss weight (Lee et al.)")
    train.add_argument("--aux-negatives", type=int, default=3, help="perturbed prompts per positive pair")
    train.add_argument("--device", default=None)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=cmd_train_reward)

    dpo = commands.add_parser("dpo-pairs", help="best/worst of N candidates per prompt -> Parquet (Pick-a-Pic v2)")
    dpo.add_argument("folder", help="DIR/<prompt_id>/{prompt.txt,*.png} or DIR/*.png + DIR/prompts.jsonl")
    dpo.add_argument("--output", required=True, help="target .parquet file")
    dpo.add_argument("--rewards", nargs="+", default=["matching"], help="names, optionally name=weight")
    dpo.add_argument("--config", default=None, help='per-reward config as JSON: \'{"clip": {"model": "..."}}\'')
    dpo.add_argument("--normalization", default="none", choices=("none", "zscore", "rank"))
    dpo.add_argument("--aggregation", default="weighted_sum", choices=("weighted_sum", "rank_sum"))
    dpo.add_argument("--margin", type=float, default=0.0, help="drop pairs whose score gap is below this")
    dpo.add_argument("--batch-size", type=int, default=32)
    dpo.set_defaults(run=cmd_dpo_pairs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from rewardscope.models.hf import ModelNotFoundError

    try:
        return args.run(args)
    except ModelNotFoundError as exc:  # a configured model is missing: say which, without a traceback
        print(f"rewardscope: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
