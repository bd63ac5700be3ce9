"""Export of the distilled student as safetensors, ONNX and ``torch.export`` (.pt2) files.

Every file is built in memory and checked against the PyTorch model before anything is written,
so a failed parity check leaves the export folder as it was. Files are then renamed into place
one by one, and ``manifest.json`` is written last with the sha256, size and parity figures.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from kdistill import __version__, artifacts, checkpoint
from kdistill.models import Classifier, build_model

log = logging.getLogger(__name__)

EXPORT_FILES = {
    "safetensors": "student.safetensors",
    "onnx": "student.onnx",
    "pt2": "student.pt2",
}
DESCRIPTION_NAME = "model.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "kdistill-export"
ONNX_OPSET = 18
PARITY_TOLERANCE = 1e-5
PARITY_BATCH_SIZES = (1, 7)
BATCH_DIM = "batch"
INPUT_NAME = "x"
OUTPUT_NAME = "logits"

Logits = Callable[[np.ndarray], np.ndarray]


class ExportError(ValueError):
    """An export that cannot be written or that fails its parity check, with the figures."""


def export_student(
    model: Classifier,
    folder: Path,
    formats: list[str],
    class_names: list[str],
    x_check: torch.Tensor,
    config: dict | None = None,
    tolerance: float = PARITY_TOLERANCE,
    check_split: str = "test",
) -> dict:
    """Write the student into ``folder`` in the requested formats; return the manifest.

    An empty ``formats`` writes nothing and returns an empty dict.

    ``x_check`` contains raw input rows (normally the test split) on which every exported format
    must reproduce the model's logits within ``tolerance`` (max absolute difference, scaled by
    the largest |logit| where that exceeds 1); ``check_split`` names their split in the
    manifest. The model runs in eval mode during
    export and gets its training flags back afterwards.
    """
    folder = Path(folder)
    if not formats:
        # An empty export.formats in the config means no export, so a run does not fail here.
        log.info("no export formats requested; nothing written to %s", folder)
        return {}
    formats = _check_formats(formats)
    x_check = _check_rows(x_check, model.spec["in_features"])
    cpu_model = _on_cpu(model)
    with eval_mode(cpu_model):
        payloads = build_payloads(cpu_model, formats)
        parity = check_parity(cpu_model, payloads, x_check, tolerance, check_split)
    description = checkpoint.describe_model(cpu_model, class_names, config)
    written = _write_files(folder, payloads, description)
    _remove_stale(folder, formats)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "formats": formats,
        "versions": _versions(),
        "onnx_opset": ONNX_OPSET if "onnx" in formats else None,
        "files": {path.name: _file_entry(path) for path in written},
        "parity": parity,
    }
    artifacts.write_json(folder / MANIFEST_NAME, manifest)
    log.info("exported %s to %s", ", ".join(path.name for path in written), folder)
    return manifest


def export_run(run_dir: str | Path, formats: list[str] | None = None) -> dict:
    """Export ``run_dir/student`` into ``run_dir/export``, checking parity on its test split.

    The split is rebuilt from ``run_dir/config.yaml``; ``formats`` defaults to all of them.
    """
    from kdistill import config as config_module
    from kdistill.data import load_splits

    formats = _check_formats(list(formats) if formats else list(EXPORT_FILES))
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ExportError(
            f"{config_path}: not found; pass the folder of a finished kdistill run as RUN_DIR"
        )
    if not (run_dir / "student").is_dir():
        raise ExportError(
            f"{run_dir} has no student/ folder (a train-teacher folder has none); pass the "
            "folder of a finished `kdistill run` or `kdistill distill`"
        )
    model = checkpoint.load(run_dir / "student")
    cfg = config_module.load(config_path)
    splits = load_splits(cfg.data, cfg.run.seed)
    _warn_if_data_changed(run_dir, splits.fingerprint)
    # The config saved beside the student is what the run itself put into model.json, so a
    # re-export gives the same bytes as the export at the end of the run.
    saved = checkpoint.read_description(run_dir / "student" / DESCRIPTION_NAME)
    manifest = export_student(
        model,
        run_dir / "export",
        formats,
        model.class_names or splits.class_names,
        splits.x_test,
        saved.get("config") or cfg.to_dict(),
    )
    _refresh_run_manifest(run_dir)
    return manifest


def _refresh_run_manifest(run_dir: Path) -> None:
    """Rewrite the run's manifest so its file list and hashes include the new export."""
    from kdistill.results import write_manifest

    path = run_dir / MANIFEST_NAME
    if path.is_file():
        recorded = artifacts.read_json(path)
        write_manifest(run_dir, recorded.get("seed", 0), recorded.get("data", {}))


def format_parity(manifest: dict) -> list[str]:
    """Render the parity figures of a manifest as one line per runtime."""
    parity = manifest["parity"]
    lines = [
        f"parity on {parity['rows']} {parity['split']} rows, max |logit difference| vs the "
        f"PyTorch model (tolerance {parity['effective_tolerance']:.3g}):"
    ]
    for runtime, checks in parity["max_abs_diff"].items():
        figures = ", ".join(f"batch {c['batch_size']}: {c['max_abs_diff']:.3g}" for c in checks)
        lines.append(f"  {runtime:<12} {figures}")
    return lines


# step: argument checks


def _check_formats(formats: list[str]) -> list[str]:
    unknown = [f for f in formats if f not in EXPORT_FILES]
    if unknown or not formats:
        raise ExportError(
            f"unknown export format(s) {unknown or formats}; choose from {', '.join(EXPORT_FILES)}"
        )
    # Keep the canonical order so that the manifest does not depend on how formats were listed.
    return [f for f in EXPORT_FILES if f in formats]


def _check_rows(x_check: torch.Tensor, features: int) -> torch.Tensor:
    if x_check.ndim != 2 or x_check.shape[1] != features or len(x_check) == 0:
        raise ExportError(
            f"parity check rows have shape {tuple(x_check.shape)}; "
            f"expected (rows >= 1, {features}) raw inputs such as the test split"
        )
    return x_check.detach().to("cpu", torch.float32).contiguous()


def _on_cpu(model: Classifier) -> Classifier:
    """Return ``model`` itself when it is on the CPU, else a CPU copy; the original stays."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).to("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own training flag."""
    flags = {name: module.training for name, module in model.named_modules()}
    model.eval()
    try:
        yield
    finally:
        # Set the flag directly: Module.train(mode) would also overwrite every child's flag.
        for name, module in model.named_modules():
            module.training = flags[name]


# step: building the files in memory


def build_payloads(model: Classifier, formats: list[str]) -> dict[str, bytes]:
    """Serialize ``model`` (in eval mode) to the bytes of each requested format."""
    payloads = {}
    if "safetensors" in formats:
        payloads["safetensors"] = save_safetensors_bytes(checkpoint.clean_state_dict(model))
    if "onnx" in formats or "pt2" in formats:
        program = trace(model)
        if "pt2" in formats:
            payloads["pt2"] = pt2_bytes(program)
        if "onnx" in formats:
            payloads["onnx"] = onnx_bytes(program)
    return payloads


def trace(model: Classifier) -> torch.export.ExportedProgram:
    """Capture ``model`` with ``torch.export`` with a dynamic batch axis.

    The example input is the normalization mean, so no data row ends up inside the .pt2 file
    (it stores its example inputs). Batch size 2 avoids torch.export specializing the batch
    axis to the size-1 case.
    """
    example = model.standardize.mean.detach().expand(2, -1).clone()
    batch = torch.export.Dim(BATCH_DIM)
    with _quiet_torch():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    # Stack traces contain the absolute paths of this checkout and of site-packages. Dropping
    # them keeps the .pt2 and .onnx bytes independent of where kdistill is installed.
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    return program


def pt2_bytes(program: torch.export.ExportedProgram) -> bytes:
    # Saving to a buffer, not to the temporary file, matters: torch.export.save names the
    # archive's top folder after the file name, which is random for a temporary file.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def onnx_bytes(program: torch.export.ExportedProgram) -> bytes:
    """Convert the traced program to ONNX with the batch axis named ``batch``."""
    with _quiet_torch():
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    proto = onnx_program.model_proto
    # Given an ExportedProgram, the exporter names the dynamic axis after torch's internal
    # symbol (such as "s77") rather than after the Dim, so the name is set here.
    symbol = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if symbol and dim.dim_param == symbol:
                dim.dim_param = BATCH_DIM
    return proto.SerializeToString()


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence the exporters' progress and deprecation messages for the duration of a call.

    With the CLI's INFO logging, onnxscript and onnx_ir would print every optimization pass,
    and torch warns that torchvision is missing. Warnings and errors still come through.
    """
    names = ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR if logger.name.startswith("torch") else logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# step: parity


def check_parity(
    model: Classifier,
    payloads: dict[str, bytes],
    x_check: torch.Tensor,
    tolerance: float,
    split: str = "test",
) -> dict[str, Any]:
    """Compare every format's logits with the model's; raise ExportError when they differ.

    The bound is ``tolerance`` times the largest |logit| of the model on ``x_check``, or
    ``tolerance`` itself when no logit exceeds 1 in magnitude.

    Each batch size runs over all rows in consecutive batches, and the reference is the model
    run on the same batches. The reference cannot be one full-batch run, because eager PyTorch
    itself differs in the last bits between a batch of 1 and a larger batch (torch 2.13 on
    CPU picks a different matrix kernel).
    """
    from kdistill import predict

    runtimes: dict[str, Logits] = {}
    if "safetensors" in payloads:
        runtimes["safetensors"] = _safetensors_logits(model, payloads["safetensors"])
    if "onnx" in payloads:
        # One thread, as for torch below.
        runtimes["onnx"] = predict.onnx_logits(payloads["onnx"], threads=1)
    if "pt2" in payloads:
        runtimes["pt2"] = predict.pt2_logits(io.BytesIO(payloads["pt2"]))

    rows = len(x_check)
    batch_sizes = sorted({*(min(b, rows) for b in PARITY_BATCH_SIZES), rows})
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in runtimes}
    with _single_torch_thread():
        for batch_size in batch_sizes:
            _compare_batches(model, runtimes, x_check, batch_size, figures)
        with torch.no_grad():
            scale = float(model(x_check).abs().max())
    # float32 spacing grows with magnitude: at |logit| = 64 it is 7.6e-6, and eager PyTorch
    # itself differs by about 2e-5 between batch 1 and a full batch on a trained 784-800-800-10
    # student whose logits reach 66. So the tolerance applies as is to logits within +-1 and
    # scales with the largest |logit| beyond that.
    effective = tolerance * max(1.0, scale)
    for name, checks in figures.items():
        for check in checks:
            difference = check["max_abs_diff"]
            if not difference <= effective:  # also catches NaN
                raise ExportError(
                    f"{EXPORT_FILES[name]}: logits differ from the PyTorch model by up to "
                    f"{difference:.3g} (max absolute difference) at batch size "
                    f"{check['batch_size']} on {rows} {split} rows, above the tolerance of "
                    f"{effective:.3g} ({tolerance:g} x max(1, largest |logit| {scale:.3g})); "
                    "nothing was written"
                )
    return {
        "split": split,
        "rows": rows,
        "tolerance": tolerance,
        "max_abs_logit": scale,
        "effective_tolerance": effective,
        "batch_sizes": batch_sizes,
        "max_abs_diff": figures,
    }


def _compare_batches(
    model: Classifier,
    runtimes: dict[str, Logits],
    x_check: torch.Tensor,
    batch_size: int,
    figures: dict[str, list[dict[str, Any]]],
) -> None:
    """Append each runtime's max absolute difference at ``batch_size`` to ``figures``."""
    batches = list(torch.split(x_check, batch_size))
    with torch.no_grad():
        reference = [model(batch).numpy() for batch in batches]
    for name, run in runtimes.items():
        difference = max(
            float(np.abs(run(batch.numpy()) - expected).max())
            for batch, expected in zip(batches, reference, strict=True)
        )
        figures[name].append({"batch_size": batch_size, "max_abs_diff": difference})


@contextlib.contextmanager
def _single_torch_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the earlier thread count.

    The checks make thousands of small calls. With two or more threads on a busy machine,
    OpenMP threads that wait for a core made each batch-1 call take about 7 ms instead of
    0.05 ms (torch 2.13, 2 shared cores). The figures are then always measured on one thread,
    whatever the machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _safetensors_logits(model: Classifier, payload: bytes) -> Logits:
    """Rebuild the model from the safetensors bytes the way ``kdistill.load`` does."""
    rebuilt = build_model(model.spec)
    rebuilt.load_state_dict(load_safetensors_bytes(payload), strict=True)
    rebuilt.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return rebuilt(torch.from_numpy(x)).numpy()

    return run


# step: writing


def _write_files(folder: Path, payloads: dict[str, bytes], description: dict) -> list[Path]:
    written = []
    if "safetensors" in payloads:
        written.append(
            artifacts.write_bytes(folder / EXPORT_FILES["safetensors"], payloads["safetensors"])
        )
    # model.json is written for every format: predict reads class names and the input width
    # from it whichever runtime it uses.
    written.append(artifacts.write_json(folder / DESCRIPTION_NAME, description))
    for name in ("onnx", "pt2"):
        if name in payloads:
            written.append(artifacts.write_bytes(folder / EXPORT_FILES[name], payloads[name]))
    return written


def _remove_stale(folder: Path, formats: list[str]) -> None:
    """Delete model files of formats not requested this time, left by an earlier export."""
    for name, file_name in EXPORT_FILES.items():
        path = folder / file_name
        if name not in formats and path.is_file():
            log.info("removing %s from an earlier export (format %s not requested)", path, name)
            path.unlink()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": artifacts.sha256_file(path), "bytes": path.stat().st_size}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "kdistill": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _warn_if_data_changed(run_dir: Path, fingerprint: str) -> None:
    manifest_path = run_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    recorded = artifacts.read_json(manifest_path).get("data", {}).get("fingerprint")
    if recorded and recorded != fingerprint:
        log.warning(
            "%s: the data now gives a different split than during the run (fingerprint %s, "
            "run had %s); parity is checked on the current test split",
            run_dir,
            fingerprint[:12],
            recorded[:12],
        )
