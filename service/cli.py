"""The `rewardscope` command line: demo, score images, export detectors.
Every subcommand goes through the Scorer (or the exporter); nothing here knows model internals."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


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
    from models import Scorer

    scorer = Scorer(["matching"], config={"matching": {"conf_threshold": args.conf}})
    pairs = [(name, path, prompt) for name, path in sample_images() for prompt in DEMO_PROMPTS]
    results = scorer.score([p for _, p, _ in pairs], [q for _, _, q in pairs])
    _print_results([(name, prompt, result) for (name, _, prompt), result in zip(pairs, results, strict=True)])
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from models import Scorer

    prompts = args.prompt * len(args.images) if len(args.prompt) == 1 else args.prompt
    if len(prompts) != len(args.images):
        print("give one --prompt for all images or one per image", file=sys.stderr)
        return 2
    weights = dict(_parse_weight(item) for item in args.rewards)
    config = {name: {"variant": args.variant} for name in weights if name == "matching"}
    scorer = Scorer(weights, config=config)
    for start in range(0, len(args.images), args.batch_size):
        images = args.images[start : start + args.batch_size]
        batch_prompts = prompts[start : start + args.batch_size]
        for path, prompt, result in zip(images, batch_prompts, scorer.score(images, batch_prompts), strict=True):
            print(json.dumps({"image": path, "prompt": prompt, **result.to_dict()}), flush=True)
    return 0


def _parse_weight(item: str) -> tuple[str, float]:
    name, _, weight = item.partition("=")
    return name, float(weight) if weight else 1.0


def cmd_export_detector(args: argparse.Namespace) -> int:
    from models.detection.export import export_ultralytics

    names = None
    if args.names == "coco":
        from models.detection.prompt import COCO_CLASSES

        names = list(COCO_CLASSES)
    elif args.names:
        names = [line.strip() for line in Path(args.names).read_text().splitlines() if line.strip()]
    path = export_ultralytics(args.model, args.output, imgsz=args.imgsz, batch=args.batch, names=names)
    print(path)
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
    return [str(bentoml), "serve", "service.app:RewardService", "--host", host, "--port", str(port)]


def cmd_serve(args: argparse.Namespace) -> int:
    command = serve_command(args.host, args.port, args.allow_remote_without_token)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    root = Path(__file__).resolve().parents[1]
    print(f"rewardscope: serving on http://{args.host}:{args.port}  (try: curl http://{args.host}:{args.port}/rewards)")
    os.chdir(root)  # bentoml resolves service.app from the working directory
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

    score = commands.add_parser("score", help="score image files against prompts; JSON lines on stdout")
    score.add_argument("images", nargs="+")
    score.add_argument("--prompt", action="append", required=True, help="once for all images, or once per image")
    score.add_argument("--rewards", nargs="+", default=["matching"], help="names, optionally name=weight")
    score.add_argument("--variant", default="seed", choices=("seed", "geneval", "numeracy"))
    score.add_argument("--batch-size", type=int, default=8)
    score.set_defaults(run=cmd_score)

    export = commands.add_parser("export-detector", help="export an ultralytics model (.pt/.yaml) to ONNX")
    export.add_argument("model", help="yolo11n.pt, yolov8s.pt, a local .pt, or a .yaml for random init")
    export.add_argument("--output", help="target .onnx path (default: beside the current directory)")
    export.add_argument("--imgsz", type=int, default=640)
    export.add_argument("--batch", type=int, default=1, help="fixed batch size baked into the export")
    export.add_argument("--names", help="'coco' or a file with one class name per line (for .yaml models)")
    export.set_defaults(run=cmd_export_detector)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
