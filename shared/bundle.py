"""The MONAI bundle format of an exported model: what `fl-server export` writes and what
`fl-client predict --model BUNDLE` reads back.

    configs/metadata.json   MONAI metadata + "fedrndpo": the network, input size, channels and
                            preprocessing (shared.inference), the consortium's aggregate figures
    configs/inference.json  a MONAI bundle config: `python -m monai.bundle run --config_file
                            configs/inference.json` segments a folder with MONAI's own runner
    models/model.pt         the network's state dict;  models/model.ts  TorchScript

The bundle's preprocessing is MONAI transforms (LoadImaged, EnsureChannelFirstd, Lambdad) whose
arithmetic is the training reader's, written out in torch: MONAI's Resize anti-aliases with a
Gaussian filter and NormalizeIntensity computes its own statistics, neither bit-identical to
training (torch's antialiased bilinear, `std_mean`), and a bundle must not need this package.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.config import ConfigError
from shared.inference import InferenceSpec
from shared.networks import NETWORKS, network_kwargs

METADATA = Path("configs") / "metadata.json"
INFERENCE = Path("configs") / "inference.json"
WEIGHTS = Path("models") / "model.pt"
TORCHSCRIPT = Path("models") / "model.ts"
README = Path("docs") / "README.md"
SECTION = "fedrndpo"  # our part of metadata.json
BATCH_SIZE = 8  # the bundle's and fl-client predict's default, so both see the same batches

_CONVERTER = ("$lambda im: im if im.mode in ('L', 'RGB', 'F') or im.mode.startswith('I') "
              "else im.convert('L' if im.mode in ('1', 'LA', 'La') else 'RGB')")


def is_bundle(path: Path) -> bool:
    return (Path(path) / METADATA).is_file() and (Path(path) / WEIGHTS).is_file()


def read_spec(bundle: Path) -> InferenceSpec:
    """The network and input settings an exported bundle records."""
    path = Path(bundle) / METADATA
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not isinstance(meta, dict) or SECTION not in meta:
        raise ConfigError(f"{path}: no '{SECTION}' section: not a bundle made by fl-server export")
    return InferenceSpec.from_dict(meta[SECTION], str(path))


def network_def(spec: InferenceSpec) -> dict:
    """The network as a MONAI bundle `_target_`: the class and keyword arguments training builds it
    with (shared.networks), so every trainable network exports and its weights load unchanged.
    ValueError (networks' words) for a model that cannot be built."""
    m = spec.model
    kwargs = network_kwargs(m.name, m.in_channels, m.channels, m.strides, m.num_res_units, m.dropout, m.args)
    return {"_target_": f"monai.networks.nets.{NETWORKS[m.name].monai_class}", **json.loads(json.dumps(kwargs))}


def inference_config(spec: InferenceSpec) -> dict:
    """configs/inference.json: read a folder, preprocess as training did, segment, save masks."""
    s = spec.image_size
    image = ["$lambda x: x.permute(2, 1, 0).contiguous().permute(2, 0, 1)"]  # (C, W, H) -> (C, H, W), rows in memory as training
    if spec.channels == 1:
        image.append("$lambda x: (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None] if x.shape[0] == 3 else x")
    image += [  # new_zeros, not torch.zeros: a blank image keeps its metadata (spatial_shape) for postprocessing
        f"$lambda x: x.new_zeros((x.shape[0], {s}, {s}), dtype=torch.float32) if x.amin() == x.amax() else x if tuple(x.shape[1:]) == ({s}, {s}) "
        f"else torch.nn.functional.interpolate(x[None], size=({s}, {s}), mode='bilinear', antialias=True, align_corners=False)[0]",
        "$lambda x: (lambda std, mean: (x - mean) / std if std > 0 else x - mean)(*torch.std_mean(x, correction=0))",
    ]
    if spec.channels == 3:
        image.append("$lambda x: x.repeat(3, 1, 1) if x.shape[0] == 1 else x")
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True,
         "reader": [{"_target_": "NibabelReader"}, {"_target_": "PILReader", "converter": _CONVERTER}]},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        *({"_target_": "Lambdad", "keys": "image", "func": f} for f in image),
    ]
    # logits -> original size (MONAI's spatial_shape is (W, H) / (x, y)) -> logit > 0 -> MONAI's indexing
    back = ("$lambda x: (lambda size: (x if tuple(x.shape[1:]) == size else torch.nn.functional.interpolate("
            "x[None].float(), size=size, mode='bilinear', align_corners=False)[0]) > 0)"
            "(tuple(int(v) for v in list(x.meta['spatial_shape'])[:2][::-1])).to(torch.uint8)")
    postprocessing = [
        {"_target_": "Lambdad", "keys": "pred", "func": back},
        {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: x.permute(0, 2, 1)"},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
         "output_ext": "@output_ext", "separate_folder": False, "resample": False, "print_log": False,
         "output_dtype": "$numpy.uint8", "scale": "$255 if @output_ext in ('.png', '.jpg', '.jpeg') else None"},
    ]
    return {
        "imports": ["$import collections", "$import glob", "$import os", "$import monai", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/images'",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".png",
        "batch_size": BATCH_SIZE,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*'))) "
                    "if f.lower().endswith(('.png', '.jpg', '.jpeg', '.nii', '.nii.gz'))]",
        "network_def": network_def(spec),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": "@batch_size",
                       "shuffle": False, "num_workers": 0},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "initialize": ["$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', "
                       "map_location=@device, weights_only=True))", "$@network.eval()", "$torch.set_grad_enabled(False)"],
        # a plain loop (SupervisedEvaluator would need pytorch-ignite): batches through the network,
        # each image's logits through postprocessing, nothing kept
        "run": ["$collections.deque((@postprocessing(item) for batch in @dataloader for item in "
                "monai.data.decollate_batch({'pred': @network(batch['image'].to(@device))})), maxlen=0)"],
    }
