"""Command line: ``allknn run``, ``allknn info``, ``allknn graph`` and ``allknn demo``.

The CLI owns the terminal: a progress bar on stderr (when it is a terminal
and ``--quiet`` is not given), results and summaries on stdout, and errors
as one line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import allknn
from allknn.engines.torch import resolved_precision

OUTPUT_SUFFIXES = (".parquet", ".npz", ".csv", ".tsv")
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

_SAMPLED = "timed here on a sample of its tiles; usually high, by up to 2x"
"""How ``allknn info`` says an estimate was made from timed tiles of the real plan."""


class CliError(Exception):
    """An error the CLI reports as one line."""


def _progress(total: int | None, quiet: bool, description: str,
              unit: str = "pairs") -> tuple[AbstractContextManager, Callable]:
    """A tqdm bar over pairs scored (or another ``unit``), on stderr, only for a terminal."""
    if quiet or not sys.stderr.isatty():
        return nullcontext(), lambda tile, pairs: None
    from tqdm import tqdm

    width = shutil.get_terminal_size((100, 24)).columns  # the fallback covers a 0-wide pty
    bar = tqdm(total=total, unit=unit, unit_scale=True, desc=description, file=sys.stderr,
               smoothing=0.1, ncols=width)
    return bar, lambda tile, pairs: bar.update(pairs)


def _self_join_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-k", type=int, default=10, help="neighbours per row (default 10)")
    parser.add_argument("--max-memory", default="1GB", help="working-memory budget, e.g. 512MB (default 1GB)")
    parser.add_argument("--threads", type=int, default=None, help="worker threads (default: all CPUs)")


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--column", help="embedding column (parquet) or array name (npz, hdf5)")
    parser.add_argument("--id-column", help="id column (parquet)")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="torch device: cpu, cuda, cuda:N or several: cuda:0,cuda:1 (with run, cuda "
                             "implies --backend torch)")
    parser.add_argument("--precision", choices=("auto", "fp32", "tf32", "bf16", "fp16"), default=None,
                        help="torch products' precision (the result is the same in all)")


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="run on this Dask scheduler (e.g. tcp://127.0.0.1:8786); INPUT must be "
                              "readable by every worker at the same path")
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="start a Dask cluster of N worker processes on this machine and run on it "
                              "(--threads: threads per worker, default 1)")
    parser.add_argument("--task-rows", type=int, default=None, help="with a cluster: rows per task block")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``allknn`` command."""
    parser = argparse.ArgumentParser(
        prog="allknn", description="Find every item's k most cosine-similar items."
    )
    parser.add_argument("--version", action="version", version=f"allknn {allknn.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="compute the kNN graph of a file")
    run.add_argument("input", help="embeddings: .npy, .npz, .parquet, .h5/.hdf5 or .fvecs")
    run.add_argument("-o", "--output", required=True,
                     help="result file: .parquet, .npz, or .csv/.tsv for a spreadsheet (small results); "
                          "with a cluster, a folder of parquet parts")
    _add_search_options(run)
    _add_input_options(run)
    run.add_argument("--ids", help="text file with one id per input row")
    run.add_argument("--queries", help="search the rows of this file against INPUT instead")
    run.add_argument("--min-similarity", type=float, default=None, help="leave out less similar neighbours")
    run.add_argument("--method", choices=("exact", "approx", "auto"), default="exact",
                     help="exact (default), approx (cells; recall measured and printed) or auto")
    run.add_argument("--recall-target", type=float, default=None,
                     help="recall@k an approximate run aims for (default 0.95)")
    run.add_argument("--backend", choices=("numba", "torch"), default="numba",
                     help="numba (default) or torch: the exact engine's tiles with products by torch")
    _add_device_options(run)
    run.add_argument("--invalid", choices=("raise", "drop"), default="raise",
                     help="zero or NaN/Inf rows: stop with an error (default) or drop them")
    run.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    run.add_argument("--scratch", metavar="DIR",
                     help="with --method approx on a cluster: a folder every worker and this machine read "
                          "and write at the same path (default: the temporary folder here)")
    run.add_argument("--checkpoint-every", type=float, default=5.0, metavar="SECONDS",
                     help="seconds between two saves of the progress (default 5)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    _add_cluster_options(run)

    info = commands.add_parser("info", help="shape, problems, estimated time and memory of a file")
    info.add_argument("input")
    _add_search_options(info)
    _add_input_options(info)
    _add_device_options(info)
    _add_cluster_options(info)

    graph = commands.add_parser("graph", help="an edge list of a result's graph: knn, mutual or union")
    graph.add_argument("result", help="a result written by allknn run (.parquet, .npz or a parts folder)")
    graph.add_argument("-o", "--output", required=True, help="edge list: .parquet")
    graph.add_argument("--kind", choices=("knn", "mutual", "union"), default="knn",
                       help="knn (each row to its neighbours, default), mutual or union (symmetric)")
    graph.add_argument("--weight", choices=("similarity", "distance", "connectivity"), default="similarity")

    report = commands.add_parser("report", help="a one-page HTML report of a result")
    report.add_argument("result", help="a result written by allknn run (.parquet, .npz or a parts folder)")
    report.add_argument("-o", "--output", required=True, help="the page: .html")

    demo = commands.add_parser("demo", help="run on a built-in clustered example")
    demo.add_argument("-n", type=int, default=50_000, help="rows (default 50000)")
    demo.add_argument("-d", type=int, default=100, help="dimensions (default 100)")
    _add_search_options(demo)
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def checkpoint_path(output: Path) -> Path:
    """Where a run writing ``output`` keeps its checkpoint."""
    return output.with_name(output.name + ".checkpoint.npz")


def _load(path: str, args: argparse.Namespace):
    """Read an input file; ``--column`` names a column (parquet) or an array
    (npz, hdf5)."""
    from allknn.readers import load

    named = Path(path).suffix.lower() in (".npz", ".h5", ".hdf5")
    return load(path, column=None if named else args.column,
                dataset=args.column if named else None, id_column=args.id_column)


def _cmd_run(args: argparse.Namespace) -> int:
    from allknn.readers import read_ids
    from allknn.writers import save_result
    from allknn.writers.results import TEXT_MAX_ENTRIES, TEXT_SUFFIXES, text_too_large

    if args.scheduler is not None or args.workers is not None:
        return _cmd_run_on_cluster(args)
    if args.scratch is not None:
        raise CliError("--scratch is the shared folder of --method approx on a cluster (--scheduler or "
                       "--workers); leave it out")
    output = Path(args.output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise CliError(f"output {output} must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if not output.parent.is_dir():
        raise CliError(f"output folder {output.parent} does not exist; create it first")
    checkpoint = checkpoint_path(output)
    if checkpoint.exists() and not args.resume:
        raise CliError(
            f"{checkpoint} holds the progress of an earlier run; pass --resume to continue it, "
            f"or delete it to start over"
        )

    data = _load(args.input, args)
    ids = data.ids
    if args.ids is not None:
        if ids is not None:
            raise CliError("give ids either with --id-column or with --ids, not both")
        ids = read_ids(args.ids, data.matrix.shape[0])
    queries = query_ids = None
    if args.queries is not None:
        query_data = _load(args.queries, args)
        queries, query_ids = query_data.matrix, query_data.ids
    n_queries = data.matrix.shape[0] if queries is None else queries.shape[0]
    if output.suffix in TEXT_SUFFIXES and n_queries * args.k > TEXT_MAX_ENTRIES:  # before any work
        raise CliError(text_too_large(output, n_queries * args.k))
    total = _self_join_pairs(n_queries) if queries is None else n_queries * data.matrix.shape[0]

    started = time.perf_counter()
    bar, on_tile = _progress(total, args.quiet, "allknn")
    with bar:
        result = allknn.neighbors(
            data.matrix, args.k, queries=queries, max_memory=args.max_memory, threads=args.threads,
            invalid=args.invalid, min_similarity=args.min_similarity, method=args.method,
            recall_target=args.recall_target, backend=args.backend, device=args.device,
            precision=args.precision,
            checkpoint=None if args.method == "approx" else checkpoint,
            checkpoint_every=args.checkpoint_every, on_tile=on_tile,
        )
    save_result(
        result, output, ids=ids, query_ids=query_ids if queries is not None else None,
        min_similarity=args.min_similarity,
        metadata={"input": str(args.input), "queries": args.queries},
    )
    checkpoint.unlink(missing_ok=True)
    if not args.quiet:
        elapsed = time.perf_counter() - started
        print(f"wrote the {args.k} nearest neighbours of {len(result)} rows to {output} "
              f"in {elapsed:.1f} s")
        if result.recall is not None:
            print(f"measured {result.recall}")
    return 0


def _cluster(args: argparse.Namespace):
    """A client of the ``--scheduler``, or of a new ``--workers N`` cluster here."""
    try:
        import distributed
    except ImportError:
        raise CliError("running on a Dask cluster needs dask.distributed, which is not installed; "
                       "pip install 'allknn[dask]'") from None
    if args.workers is not None:
        if args.workers < 1:
            raise CliError(f"--workers must be at least 1, got {args.workers}")
        from allknn.engines.dask.cluster import local_cluster

        cluster = local_cluster(args.workers, args.threads or 1, dashboard_address=":0")
        return distributed.Client(cluster), cluster
    try:
        return distributed.Client(args.scheduler, timeout="10s"), None
    except (OSError, TimeoutError) as exc:
        raise CliError(f"cannot reach the Dask scheduler at {args.scheduler} ({exc}); start one with "
                       f"'dask scheduler' and workers with 'dask worker {args.scheduler}', or check the "
                       f"address") from None


def _cmd_run_on_cluster(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix in OUTPUT_SUFFIXES:
        raise CliError(f"with a cluster the output is a folder of parquet parts; give a folder name, "
                       f"not {output}")
    if args.method == "auto":
        raise CliError("on a cluster, choose --method exact or --method approx")
    if args.scheduler is not None and args.threads is not None:
        raise CliError("--threads does not apply with --scheduler: the workers run as many tasks at once as "
                       "their --nthreads; leave it out")
    if args.method == "exact" and args.recall_target is not None:
        raise CliError("--recall-target is for --method approx; leave it out")
    device = args.device or ("cpu" if args.backend == "torch" else None)
    if args.method != "approx" and args.scratch is not None:
        raise CliError("--scratch is the shared folder of --method approx on a cluster; leave it out")
    if args.method == "approx" and args.queries is not None:
        raise CliError("the approximate engine on a cluster runs the self-join only: leave --queries out")
    started = time.perf_counter()
    client, cluster = _cluster(args)
    try:
        if not args.quiet:
            print(f"cluster: {len(client.nthreads())} worker(s), dashboard "
                  f"{client.dashboard_link}", file=sys.stderr)
        bar, on_tile = _progress(None, args.quiet, "allknn", "rows searched" if args.method == "approx"
                                 else "pairs")
        if args.method == "approx":
            from allknn.engines.dask.approx import dask_approx_neighbors
            from allknn.writers.parts import folder_recall

            with bar:
                dask_approx_neighbors(args.input, args.k, client=client, max_memory=args.max_memory,
                                      invalid=args.invalid, min_similarity=args.min_similarity,
                                      task_rows=args.task_rows, column=args.column,
                                      recall_target=args.recall_target, output=output, resume=args.resume,
                                      ids=args.ids, id_column=args.id_column, device=device,
                                      precision=args.precision, scratch=args.scratch,
                                      on_task=lambda kind, rows: on_tile(None, rows) if kind == "probe"
                                      else None)
            if not args.quiet:
                print(f"measured {folder_recall(output)}")
        else:
            with bar:
                allknn.dask_neighbors(args.input, args.k, client=client, queries=args.queries,
                                      max_memory=args.max_memory, invalid=args.invalid,
                                      min_similarity=args.min_similarity, task_rows=args.task_rows,
                                      column=args.column, output=output, resume=args.resume,
                                      ids=args.ids, id_column=args.id_column, device=device,
                                      precision=args.precision,
                                      on_task=lambda kind, count: on_tile(None, count) if kind == "pair"
                                      else None)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if not args.quiet:
        print(f"wrote the {args.k} nearest neighbours to the parts of {output} in "
              f"{time.perf_counter() - started:.1f} s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    if args.scheduler is not None or args.workers is not None:
        return _cmd_info_on_cluster(args)
    named = Path(args.input).suffix.lower() in (".npz", ".h5", ".hdf5")
    found = allknn.inspect(args.input, args.k, max_memory=args.max_memory, threads=args.threads,
                           column=None if named else args.column, dataset=args.column if named else None,
                           id_column=args.id_column, device=args.device, precision=args.precision)
    n, d = found.shape
    zero, nonfinite = found.zero_rows, found.nonfinite_rows
    print(f"file:        {args.input}")
    kind = "dense" if found.stored_values is None else f"sparse, {found.stored_values} stored values"
    print(f"shape:       {n} x {d}, {found.dtype}, {kind}")
    print(f"ids:         {'yes' if found.ids else 'no (row numbers)'}")
    print(f"zero rows:   {zero.size}" + (f" (first: {', '.join(map(str, zero[:5]))})" if zero.size else ""))
    print(f"NaN/Inf rows: {nonfinite.size}"
          + (f" (first: {', '.join(map(str, nonfinite[:5]))})" if nonfinite.size else ""))
    device = args.device or "cpu"
    what = {"exact": "the exact self-join", "approx": "method='approx'",
            "torch": f"--backend torch on {device} (precision {resolved_precision(device, args.precision)})"}
    how = {"exact": _SAMPLED if found.stored_values is not None else "from tile products timed here",
           "approx": "modelled from the exact engine's speed", "torch": _SAMPLED}
    for name, estimate in found.engines.items():
        if estimate.refusal is not None:
            print(f"{name + ':':<12} cannot run: {estimate.refusal}")
            continue
        print(f"estimate:    {_seconds(estimate.seconds)} s for {what[name]} with k={found.k} on "
              f"{found.threads} thread(s) ({how[name]})")
        print(f"memory:      about {estimate.memory_bytes / 1e6:.0f} MB beyond the input "
              f"(block_rows={found.block_rows})")
    return 0


def _seconds(seconds: float) -> str:
    """Seconds to one decimal, or two significant digits below one second (never a bare 0.0)."""
    return f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2g}"


def _cmd_info_on_cluster(args: argparse.Namespace) -> int:
    from allknn.engines.dask import estimate_dask_seconds

    client, cluster = _cluster(args)
    try:
        threads = sum(client.nthreads().values())
        seconds, timed = estimate_dask_seconds(args.input, args.k, client=client, max_memory=args.max_memory,
                                               task_rows=args.task_rows, column=args.column,
                                               device=args.device, precision=args.precision)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(f"file:        {args.input}")
    on = f", tiles on {args.device}" if args.device else ""
    print(f"estimate:    {_seconds(seconds)} s for the exact self-join with k={args.k} on {threads} worker "
          f"thread(s) (from {timed} tasks timed on the cluster{on})")
    return 0


def _stored_ids(path: str) -> object:
    """The ids a parquet result or a parts folder keeps (None for other results, or row numbers)."""
    from allknn.writers.neighbor_table import stored_ids
    from allknn.writers.parts import folder_labels

    if Path(path).is_dir():
        return folder_labels(path)["neighbor_id"]
    return stored_ids(path) if Path(path).suffix.lower() == ".parquet" else None


def _cmd_graph(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix != ".parquet":
        raise CliError(f"output {output} must end in .parquet")
    result = allknn.load_result(args.result)
    edges = result.graph(args.kind, args.weight).tocoo()
    if args.kind != "knn":  # each undirected edge once
        keep = edges.row < edges.col
        edges = type(edges)((edges.data[keep], (edges.row[keep], edges.col[keep])), shape=edges.shape)
    from allknn.writers import save_edges

    ids = _stored_ids(args.result)
    save_edges(output, edges.row if ids is None else ids[edges.row],
               edges.col if ids is None else ids[edges.col], edges.data, weight=args.weight)
    print(f"wrote {edges.nnz} {args.kind} edges to {output}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise CliError(f"output {output} must end in .html")
    allknn.load_result(args.result).report(output, ids=_stored_ids(args.result),
                                           title=f"allknn: {args.result}")
    print(f"wrote the report of {args.result} to {output}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from allknn.datasets import make_clustered

    X = make_clustered(args.n, args.d, seed=0)
    print(f"demo: {args.n} x {args.d} clustered float32 embeddings, k={args.k}")
    warm_up = X[:9000]  # enough rows for every kernel (ordering included) to compile outside the timing
    allknn.neighbors(warm_up, min(args.k, warm_up.shape[0] - 1), threads=args.threads)
    bar, on_tile = _progress(_self_join_pairs(args.n), args.quiet, "demo")
    started = time.perf_counter()
    with bar:
        result = allknn.neighbors(X, args.k, max_memory=args.max_memory, threads=args.threads,
                                  on_tile=on_tile)
    elapsed = time.perf_counter() - started
    pairs = args.n * (args.n - 1) / 2
    print(f"time: {elapsed:.2f} s, {args.n / elapsed:,.0f} rows/s, {pairs / elapsed:.3g} pairs/s "
          f"on {result.params['threads']} thread(s)")
    for row in range(min(5, args.n)):
        pairs_shown = zip(result.indices[row, :5], result.similarities[row, :5], strict=True)
        shown = ", ".join(f"{j} ({s:.3f})" for j, s in pairs_shown)
        print(f"row {row}: {shown}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``allknn`` command."""
    args = build_parser().parse_args(argv)
    command = {"run": _cmd_run, "info": _cmd_info, "graph": _cmd_graph, "report": _cmd_report,
               "demo": _cmd_demo}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        resume = " (rerun with --resume to continue)" if args.command == "run" else ""
        print(f"allknn: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, ValueError, TypeError, OSError, ImportError) as exc:
        print(f"allknn: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
