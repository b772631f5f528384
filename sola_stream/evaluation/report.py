"""What a compressed directory holds: method, ratios, ranks per block and layer."""
from __future__ import annotations

from pathlib import Path


from sola_stream.families import family_for, meta_model
from sola_stream.storage.checkpoint import CheckpointReader, read_json_object
from sola_stream.errors import InputError
from sola_stream.nn.build import check_layer_shapes, linear_params
from sola_stream.storage.sola_section import check_sola_section
from sola_stream.pipeline.skeleton import load_config


def summary_dict(path: str) -> dict:
    """The `sola` section, checked against the stored tensors' shapes (read from shard headers)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise InputError(f"{config_file}: missing (not a finished sola_stream output)")
    config = read_json_object(config_file, "config.json")
    if "sola" not in config:
        raise InputError(f"{config_file}: no 'sola' section (not a sola_stream output)")
    reader = CheckpointReader(path)
    model_config = load_config(reader)
    family = family_for(model_config, str(config_file))
    sola = check_sola_section(config["sola"], family.text(config, str(config_file))["num_hidden_layers"],
                              family.linears, str(config_file))
    layers = [family.prepare(b) for b in meta_model(model_config, str(config_file)).get_submodule(family.layers_path)]
    rows = []
    for i, block in enumerate(sola["blocks"]):
        prefix = family.block_prefix(i)
        row = {"block": i}
        for name, spec in block["layers"].items():
            meta = layers[i].get_submodule(name)
            m, n = meta.out_features, meta.in_features
            stored = {k[len(prefix + name) + 1:]: reader.shape(k) for k in reader.names(prefix + name + ".")}
            try:
                check_layer_shapes(spec, m, n, stored, prefix + name + ".")
            except ValueError as exc:
                raise InputError(f"{path}: block {i}: {exc}") from None
            errors = block.get("whitened_error") if isinstance(block.get("whitened_error"), dict) else {}
            row[name] = {**{k: v for k, v in spec.items() if k != "split"},
                         "kept": linear_params(spec, m, n) / (m * n), "whitened_error": errors.get(name)}
        rows.append(row)
    return {
        "path": str(path),
        "method": sola["method"],
        "target_ratio": sola["ratio"],
        "prime_ratio": "auto" if sola.get("prime_choices") else sola["prime_ratio"],
        "achieved_ratio_blocks": sola["achieved_ratio_blocks"],
        "achieved_ratio_model": sola["achieved_ratio_model"],
        "propagate": sola.get("propagate"),
        "fit": sola.get("fit", "plain"),
        "allocation": sola.get("allocation", "block"),
        "calibration": sola.get("calibration"),
        "blocks": rows,
    }


def plot(info: dict, path: str) -> None:
    """Per block, the kept fraction of each layer and its whitened error (PNG/SVG/PDF by suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib (or the project's [eval] extra)") from None
    names = [n for n in info["blocks"][0] if n != "block"]
    blocks = [b["block"] for b in info["blocks"]]
    fig, (kept, err) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name in names:
        kept.plot(blocks, [b[name]["kept"] for b in info["blocks"]], marker=".", label=name.split(".")[-1])
        err.plot(blocks, [b[name]["whitened_error"] or 0.0 for b in info["blocks"]], marker=".",
                 label=name.split(".")[-1])
    kept.set_ylabel("kept fraction of weights")
    kept.set_title(f"{Path(info['path']).name}: {info['method']}, achieved ratio {info['achieved_ratio_blocks']:.3f} "
                   "(block linears)")
    err.set_ylabel("whitened error (dropped energy)")
    err.set_xlabel("block")
    kept.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot write the plot ({exc})") from None
    finally:
        plt.close(fig)


def describe(info: dict) -> str:
    lines = [f"{info['path']}: method {info['method']}, prime ratio {info['prime_ratio']}",
             f"ratio: target {info['target_ratio']:.4f}, achieved {info['achieved_ratio_blocks']:.4f} "
             f"(block linears), {info['achieved_ratio_model']:.4f} (whole model)"]
    names = [n for n in info["blocks"][0] if n != "block"] if info["blocks"] else []
    short = [n.split(".")[-1] for n in names]
    lines.append("block " + " ".join(f"{s:>14}" for s in short) + "   (rank, +prime; dense = kept dense)")
    for b in info["blocks"]:
        cells = []
        for n in names:
            spec = b[n]
            r = "dense" if spec.get("rank") is None else str(spec["rank"])
            cells.append(f"{r + (' +' + str(spec['prime']) if 'prime' in spec else ''):>14}")
        lines.append(f"{b['block']:>5} " + " ".join(cells))
    return "\n".join(lines)
