"""`letterrec`: one subcommand per offline stage, `pipeline` for all of them, `serve`, `demo`.

A thin dispatcher: stage commands import training/, serve imports service/ only, lazily, so the
serving process never loads training code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="LETTER generative recommendation: offline pipeline and serving.", no_args_is_help=True
)
console = Console(stderr=True)

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Dataset: a directory of LC-Rec JSON (X.inter.json, X.item.json) or RecBole atomic "
        "files (X.inter, X.item), auto-detected; or 'ml-100k' (embedded).",
    ),
]
OutOpt = Annotated[
    Path, typer.Option("--out", help="Bundle directory to write (stages resume from it).")
]
ProfileOpt = Annotated[
    str, typer.Option("--profile", help="Named configuration: 'full' (paper) or 'quick'.")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="JSON experiment file: the fields it names replace the profile's (--profile), "
        "section by section; every other field keeps the profile's value.",
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (CUDA when present).")
]
RecommenderOpt = Annotated[
    str | None,
    typer.Option(
        "--recommender",
        help="scratch (a small Llama over the codes) or llm (a pretrained LM fine-tuned with "
        "LoRA, LC-Rec style; needs --base-model). Default: the profile's (scratch).",
    ),
]
BaseModelOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        help="Local Hugging Face causal LM directory (Qwen2/Qwen3, Llama, SmolLM...) for the "
        "llm recommender; implies --recommender llm.",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo stages whose outputs exist.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        min=0,
        help="torch CPU threads (0 = torch's default). 1 is fastest for the small ops of SASRec "
        "and the tokenizer on a busy machine.",
    ),
]

NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        min=1,
        help="Train the recommender on N data-parallel processes (torch.distributed through "
        "torchrun's launcher: gloo on CPU, one GPU each on CUDA), with the global batch and "
        "schedule of one process; the CPU threads are split among them. Default: the "
        "configuration's lm.nproc (1).",
    ),
]


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise typer.BadParameter(
            f"device '{name}': use cpu, cuda, cuda:N or auto", param_hint="--device"
        )
    return name


def _workspace(
    data: str,
    out: Path,
    profile: str,
    config: Path | None,
    device: str,
    force: bool,
    quiet: bool,
    recommender: str | None = None,
    base_model: str | None = None,
    nproc: int | None = None,
):  # noqa: ANN202
    from training.config import resolve_config
    from training.pipeline import Workspace

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = resolve_config(profile, config).with_llm(base_model, recommender).with_nproc(nproc)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    return Workspace(
        out=out,
        cfg=cfg.with_device(_device(device)),
        data_spec=data,
        force=force,
        progress=not quiet,
    )


def _summary(title: str, rows: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict | list):
            v = json.dumps(v, default=float)[:160]
        table.add_row(str(k), str(v))
    console.print(table)


def _run(stage: str, ws) -> dict[str, Any]:  # noqa: ANN001
    from training import pipeline
    from training.data import DataError

    fn = {
        "data": pipeline.stage_data,
        "embed": pipeline.stage_embed,
        "cf": pipeline.stage_cf,
        "tokenizer": pipeline.stage_tokenizer,
        "lm": pipeline.stage_lm,
        "mode": pipeline.stage_mode,
        "evaluate": pipeline.stage_evaluate,
    }[stage]
    try:
        result = fn(ws)
    except (DataError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error[/red] in stage '{stage}': {e}")
        raise typer.Exit(2) from e
    _summary(f"stage {stage}", {k: v for k, v in result.items() if k not in ("history", "config")})
    return result


# stage -> (command name, help). One command per offline stage, all with the same options.
STAGE_COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data", "Load and split a dataset; print its summary."),
    "embed": ("embed", "Item text -> embeddings (cached on disk by encoder and text)."),
    "cf": ("cf", "Train SASRec; CF item embeddings plus the SASRec baseline metrics."),
    "tokenizer": (
        "tokenizer",
        "Train the LETTER tokenizer; write tokenizer/, catalogue.parquet, manifest.json, report/.",
    ),
    "lm": (
        "train-lm",
        "Train the generative recommender (resumable): from scratch, or a pretrained LM with "
        "LoRA (--base-model); write lm/ and the manifest's vocabulary into the bundle.",
    ),
    "mode": (
        "fit-mode",
        "Choose the recommendation mode (plain, history excluded, repeat-aware) and fit the "
        "repeat prior on validation users; write them into the manifest.",
    ),
    "evaluate": (
        "evaluate",
        "Leave-one-out test of popularity, recent history, SASRec and the bundle's recommender "
        "(plain and repeat-aware), with bootstrap standard errors.",
    ),
}
STAGES = list(STAGE_COMMANDS)


def _stage_command(stage: str) -> None:
    name, doc = STAGE_COMMANDS[stage]

    def command(
        data: DataOpt = "ml-100k",
        out: OutOpt = Path("bundles/ml-100k"),
        profile: ProfileOpt = "full",
        config: ConfigOpt = None,
        device: DeviceOpt = "auto",
        force: ForceOpt = False,
        quiet: QuietOpt = False,
        threads: ThreadsOpt = 0,
        recommender: RecommenderOpt = None,
        base_model: BaseModelOpt = None,
    ) -> None:
        _set_threads(threads)
        ws = _workspace(data, out, profile, config, device, force, quiet, recommender, base_model)
        _run(stage, ws)

    command.__doc__ = doc
    app.command(name)(command)


for _stage in STAGES:
    if _stage not in ("lm", "evaluate"):
        _stage_command(_stage)


@app.command(STAGE_COMMANDS["lm"][0])
def train_lm_command(
    data: DataOpt = "ml-100k",
    out: OutOpt = Path("bundles/ml-100k"),
    profile: ProfileOpt = "full",
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = 0,
    recommender: RecommenderOpt = None,
    base_model: BaseModelOpt = None,
    nproc: NprocOpt = None,
) -> None:
    _set_threads(threads)
    ws = _workspace(
        data, out, profile, config, device, force, quiet, recommender, base_model, nproc
    )
    _run("lm", ws)


train_lm_command.__doc__ = STAGE_COMMANDS["lm"][1]


@app.command("evaluate")
def evaluate(
    data: DataOpt = "ml-100k",
    out: OutOpt = Path("bundles/ml-100k"),
    profile: ProfileOpt = "full",
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = 0,
    cold_items: Annotated[
        float,
        typer.Option(
            "--cold-items",
            min=0.0,
            max=0.5,
            help="Also run the new-item protocol: this share of the newest items is kept out of "
            "every training stage (in OUT/coldstart/), tokenized from text as POST /tokenize "
            "does, and recommended at test time -> report/coldstart.json.",
        ),
    ] = 0.0,
) -> None:
    """Leave-one-out test of popularity, recent history, SASRec and the bundle's recommender
    (plain and repeat-aware), with bootstrap standard errors; with --cold-items, new items."""
    _set_threads(threads)
    ws = _workspace(data, out, profile, config, device, force, quiet)
    if (out / "lm" / "config.json").exists() or cold_items == 0:
        _run("evaluate", ws)
    if cold_items > 0:
        from training.coldstart import evaluate_coldstart
        from training.tokenizer_report import write_json

        try:
            result = evaluate_coldstart(ws, cold_items)
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[red]error[/red] in the new-item evaluation: {e}")
            raise typer.Exit(2) from e
        write_json(result, out / "report" / "coldstart.json")
        _summary(
            "new items (cold targets)",
            {
                r["model"]: f"R@10 {r['recall@10_cold']:.4f} N@10 {r['ndcg@10_cold']:.4f} "
                f"(all: {r['recall@10']:.4f} / {r['ndcg@10']:.4f})"
                for r in result["rows"]
            },
        )


@app.command()
def pipeline(
    data: DataOpt = "ml-100k",
    out: OutOpt = Path("bundles/ml-100k"),
    profile: ProfileOpt = "full",
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    stages: Annotated[
        str, typer.Option("--stages", help="Comma-separated subset of the stages, in order.")
    ] = "",
    threads: ThreadsOpt = 0,
    recommender: RecommenderOpt = None,
    base_model: BaseModelOpt = None,
    nproc: NprocOpt = None,
) -> None:
    """All offline stages in order; each resumes from its saved output. With --base-model DIR
    the recommender is that pretrained LM fine-tuned with LoRA (LC-Rec style); with --nproc N
    the from-scratch recommender trains on N data-parallel processes."""
    _set_threads(threads)
    ws = _workspace(
        data, out, profile, config, device, force, quiet, recommender, base_model, nproc
    )
    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else STAGES
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise typer.BadParameter(
            f"unknown stage(s) {unknown}; valid: {STAGES}", param_hint="--stages"
        )
    for stage in chosen:
        _run(stage, ws)
    console.print(f"[green]bundle ready[/green]: {out}")


@app.command()
def serve(
    bundle: Annotated[Path, typer.Option("--bundle", help="Bundle directory to serve.")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    engine: Annotated[
        str | None, typer.Option("--engine", help="torch or vllm (default: setting).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu or cuda (default: setting).")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", help="Shared catalogue store.")
    ] = None,
) -> None:
    """Serve a bundle over HTTP (settings from LETTERREC_* environment variables)."""
    from service.server import run  # the service never imports training code

    overrides = {
        k: v for k, v in {"engine": engine, "device": device, "redis_url": redis_url}.items() if v
    }
    try:
        run(bundle, host=host, port=port, **overrides)
    except ValueError as e:
        console.print(f"[red]error[/red]: {e}")
        raise typer.Exit(2) from e


@app.command()
def demo(
    out: OutOpt = Path("bundles/ml-100k"),
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    build_only: Annotated[
        bool, typer.Option("--build-only", help="Build the bundle, do not serve.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build the embedded ml-100k bundle (quick profile) if missing, then serve it."""
    if not (out / "lm" / "config.json").exists():
        ws = _workspace("ml-100k", out, "quick", None, "auto", False, quiet)
        for stage in STAGES:
            _run(stage, ws)
    if build_only:
        console.print(f"[green]bundle ready[/green]: {out}")
        return
    import os
    import secrets

    if not os.environ.get("LETTERREC_API_KEYS"):
        # Writes (/tokenize) always need a key; the demo makes a throwaway one and shows it.
        os.environ["LETTERREC_API_KEYS"] = key = secrets.token_urlsafe(16)
        console.print(f"demo API key for POST /tokenize: Authorization: Bearer {key}")
    console.print(f"serving {out} on http://{host}:{port} (OpenAPI at /openapi.json)")
    serve(bundle=out, host=host, port=port)


@app.command("toy-llm")
def toy_llm(
    out: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    data: DataOpt = "ml-100k",
    arch: Annotated[str, typer.Option("--arch", help="llama or qwen2.")] = "llama",
    hidden: Annotated[int, typer.Option("--hidden", min=32)] = 64,
    layers: Annotated[int, typer.Option("--layers", min=1)] = 2,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Pretraining steps.")] = 40,
    quiet: QuietOpt = False,
) -> None:
    """A small stand-in for a pretrained LLM where none can be downloaded: a byte-level BPE
    tokenizer and a Llama/Qwen2 (tied, padded vocabulary) briefly pretrained on the dataset's
    item texts, saved as a Hugging Face directory for `--base-model`. It exercises the LLM
    recommender end to end; its recommendations say nothing about a real LLM's quality."""
    from models.item_tokenizer import TextTemplate
    from training.config import PipelineConfig
    from training.data import load_dataset
    from training.embed import item_texts
    from training.toy_llm import ToyLLMConfig, make_toy_llm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        heads = max(1, hidden // 32)
        cfg = ToyLLMConfig(
            arch=arch, hidden=hidden, layers=layers, heads=heads, kv_heads=heads, steps=steps
        )
        ds = load_dataset(data)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    texts, _ = item_texts(ds, TextTemplate(PipelineConfig().text_fields))
    make_toy_llm(texts, out, cfg, progress=not quiet)
    console.print(f"[green]toy LLM ready[/green]: {out} (use it as --base-model {out})")


@app.command("batch-recommend")
def batch_recommend(
    bundle: Annotated[Path, typer.Option("--bundle", help="Bundle directory.")],
    users: Annotated[
        str,
        typer.Option(
            "--users",
            help="Users to recommend for: a Parquet file (user_id, history = list of item ids, "
            "oldest first), or a dataset as for --data (each user's whole sequence).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Output directory of Parquet parts (resumes when rerun)."),
    ],
    runner: Annotated[
        str, typer.Option("--runner", help="local, or ray (the scale extra).")
    ] = "local",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray actors.")] = 1,
    k: Annotated[int, typer.Option("--k", min=1, max=100)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, help="Users per part (unit of resumption).")
    ] = 4096,
    threads: Annotated[
        int, typer.Option("--threads", min=0, help="torch CPU threads per worker (0: default).")
    ] = 0,
    device: DeviceOpt = "cpu",
    gpus_per_worker: Annotated[
        float,
        typer.Option("--gpus-per-worker", min=0, help="ray: GPUs per actor (default: 1 on cuda)."),
    ] = 0.0,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="ray: cluster to join (default: local).")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Top-k of every user into Parquet (user_id, rank, item_id, score), as /recommend answers."""
    from service.batch import BatchConfig, BatchError, read_users_parquet, run_local, users_table

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if runner not in ("local", "ray"):
        raise typer.BadParameter(f"'{runner}': use local or ray", param_hint="--runner")
    try:
        cfg = BatchConfig(
            bundle, k, batch_size, chunk_size, device=_device(device), threads=threads
        )
        if Path(users).suffix == ".parquet" or Path(users).is_file():
            table = read_users_parquet(Path(users))
        else:
            from training.data import DataError, load_dataset

            try:
                ds = load_dataset(users)
            except DataError as e:
                raise BatchError(str(e)) from e
            table = users_table(ds.user_ids, [[ds.item_ids[r] for r in s] for s in ds.sequences])
        if runner == "ray":
            from service.batch_ray import run_ray

            gpus = gpus_per_worker or (1.0 if cfg.device.startswith("cuda") else 0.0)
            result = run_ray(table, out, cfg, workers, gpus, ray_address, progress=not quiet)
        else:
            _set_threads(threads)
            result = run_local(table, out, cfg, progress=not quiet)
    except BatchError as e:
        console.print(f"[red]error[/red]: {e}")
        raise typer.Exit(2) from e
    _summary("batch-recommend", {**result, "out": str(out)})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
