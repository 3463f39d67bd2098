"""Start from your own model (issue 13, item 4): the MONAI networks `model.name` accepts, their
`model.args` checked at config load, backbone weights from disk only, and base checkpoints (ours,
a plain state dict, a MONAI bundle folder) checked against the network before any round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.checkpoints import initial_model, matching_state, read_state
from shared.config import ConfigError, ModelConfig, SupervisedConfig, load_consortium, to_yaml
from shared.data import SplitData
from shared.model import load_state, seed_everything
from shared.networks import MODEL_NAMES, settable_args
from shared.site import load_model, model_from_config
from shared.training import supervised_round

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "lung_cxr"

# one tiny configuration per network (32 px): what a hospital would write under model:
TINY = {
    "unet": {"name": "unet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "basic_unet": {"name": "basic_unet", "channels": [4, 8, 8, 16]},
    "segresnet": {"name": "segresnet", "args": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}},
    "attention_unet": {"name": "attention_unet", "channels": [8, 16, 32], "strides": [2, 2]},
    "flexible_unet": {"name": "flexible_unet", "args": {"backbone": "efficientnet-b0",
                                                         "decoder_channels": [32, 16, 16, 8, 8]}},
    "flexible_unet_resnet18": {"name": "flexible_unet", "args": {"backbone": "resnet18",
                                                                  "decoder_channels": [32, 16, 16, 8, 8]}},
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _consortium(tmp_path: Path, model: dict | str, extra: str = "", name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"name: t\nrun_dir: {tmp_path / 'run'}\nsites: [a.yaml]\nmodel: {json.dumps(model)}\n{extra}")
    return path


def _load_error(tmp_path, model, extra="") -> str:
    with pytest.raises(ConfigError) as err:
        load_consortium(_consortium(tmp_path, model, extra))
    return str(err.value)


def _disks(n: int, seed: int, size: int = 32) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.randint(9, size - 9, (n, 2), generator=g)
    inside = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2 <= 36
    masks = inside.unsqueeze(1).to(torch.uint8)
    images = masks.float() + 0.5 * torch.randn(n, 1, size, size, generator=g)
    return SplitData(names=[str(i) for i in range(n)], images=images, masks=masks)


# ----------------------------------------------------------------------------- every network


@pytest.mark.parametrize("key", sorted(TINY))
def test_each_network_trains_a_round_and_samples_mc_dropout(tmp_path, key):
    cfg = load_consortium(_consortium(tmp_path, TINY[key])).model  # checked at config load, built there
    seed_everything(0)
    model = model_from_config(cfg)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32)  # one logit map at the input's size

    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = supervised_round(model, _disks(8, 1), SupervisedConfig(steps=2, lr=1e-3, batch_size=4), torch.device("cpu"))
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    # MC dropout as proposals.py runs it: only the dropout layers in train mode; two draws differ
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.train()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
    assert not torch.equal(a, b), f"{key}: MC-dropout samples are identical with model.dropout 0.1"


def test_model_names_are_the_config_choices():
    assert MODEL_NAMES == ("unet", "basic_unet", "segresnet", "attention_unet", "flexible_unet")
    assert "backbone" in settable_args("flexible_unet") and "pretrained" not in settable_args("flexible_unet")
    assert "dropout_prob" not in settable_args("segresnet")  # model.dropout sets it


def test_flat_unet_config_loads_without_torch(tmp_path):
    path = _consortium(tmp_path, TINY["unet"])
    code = (f"import sys; from shared.config import load_consortium; load_consortium({str(path)!r}); "
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_args_round_trip_through_the_run_dirs_yaml(tmp_path):
    cfg = load_consortium(_consortium(tmp_path, TINY["segresnet"]))
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_consortium(again).model == cfg.model
    assert load_consortium(_consortium(tmp_path, {"name": "unet"})).model == ModelConfig()


@pytest.mark.parametrize("model,extra,expected", [
    ({"name": "segresnet", "args": {"init_filter": 8}},
     "", "c.yaml: model.args.init_filter: is not an argument of MONAI SegResNet; valid: init_filters, act, norm"),
    ({"name": "flexible_unet", "args": {"backbone": "resnet18", "pretrained": True}},
     "", "c.yaml: model.args.pretrained: FlexibleUNet(pretrained=...) downloads weights at run time; put the "
         "backbone weights on disk and give model.pretrained_weights: PATH"),
    ({"name": "flexible_unet"}, "", "c.yaml: model.args.backbone: is required by FlexibleUNet: one of efficientnet-b0"),
    ({"name": "flexible_unet", "args": {"backbone": "resnet19"}},
     "", "c.yaml: model.args.backbone: 'resnet19' is not one of efficientnet-b0"),
    ({"name": "segresnet", "channels": [8, 16]},
     "", "c.yaml: model.channels: does not apply to segresnet; give SegResNet's own arguments under model.args (valid: "),
    ({"name": "segresnet", "args": {"dropout_prob": 0.2}}, "", "c.yaml: model.args.dropout_prob: is set by model.dropout"),
    ({"name": "unet", "args": {"out_channels": 2}}, "", "c.yaml: model.args.out_channels: is fixed: spatial_dims 2"),
    ({"name": "segresnet", "args": {"upsample_mode": "bogus"}}, "", "c.yaml: model.args: MONAI SegResNet refused them: "),
    ({"name": "unet", "args": [1]}, "", "c.yaml: model.args: expected a mapping of names to values, got a list"),
    ({"name": "unet", "pretrained_weights": "w.pt"},
     "", "c.yaml: model.pretrained_weights: applies to flexible_unet's backbone only"),
    ({"name": "flexible_unet", "args": {"backbone": "resnet18"}, "pretrained_weights": "nowhere.pth"},
     "", "nowhere.pth is not a file (backbone weights are read from disk, never downloaded)"),
    ({"name": "unet", "dropout": 0.0}, "preference: {rounds: 1}\n",
     "c.yaml: preference.proposals.mc_samples: 4 MC-dropout samples need model.dropout > 0"),
])
def test_model_settings_are_checked_at_config_load(tmp_path, model, extra, expected):
    message = _load_error(tmp_path, model, extra)
    assert expected in message and "\n" not in message


def test_no_dropout_is_fine_without_mc_samples_or_preference_rounds(tmp_path):
    load_consortium(_consortium(tmp_path, {"name": "unet", "dropout": 0.0}, "preference: {rounds: 0}\n"))
    load_consortium(_consortium(tmp_path, {"name": "unet", "dropout": 0.0},
                                "preference: {rounds: 1, proposals: {mc_samples: 0}}\n"))


# ----------------------------------------------------------------------------- backbone weights


@pytest.mark.parametrize("backbone,first,later,head", [
    ("resnet18", "conv1.weight", "layer1.0.conv1.weight", "fc"),  # torchvision's layout
    ("efficientnet-b0", "_conv_stem.weight", "_blocks.1.1._expand_conv.weight", "_fc"),  # efficientnet-pytorch's
])
def test_backbone_weights_come_from_disk_and_are_never_downloaded(tmp_path, monkeypatch, backbone, first, later, head):
    import re

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    # an ImageNet-style file: the RGB backbone as its own library saves it, classifier head included
    rgb = load_model(ModelConfig(name="flexible_unet", in_channels=3, args={"backbone": backbone})).encoder
    flat = re.compile(r"(.+)\.\d+(\.\d+\..+)")  # efficientnet-pytorch numbers blocks flat, MONAI by stage
    weights = {flat.sub(r"\1\2", k): torch.randn_like(v) if v.is_floating_point() else v
               for k, v in rgb.state_dict().items() if not k.startswith("_fc.")}
    weights |= {f"{head}.weight": torch.randn(1000, 8), f"{head}.bias": torch.randn(1000)}
    torch.save(weights, tmp_path / "backbone.pth")
    cfg = load_consortium(_consortium(tmp_path, {"name": "flexible_unet", "args": {"backbone": backbone},
                                                 "pretrained_weights": "backbone.pth"}))
    encoder = initial_model(cfg).encoder.state_dict()
    assert torch.equal(encoder[later], weights[flat.sub(r"\1\2", later)])
    assert torch.allclose(encoder[first], weights[first].sum(1, keepdim=True))  # RGB -> grey

    torch.save({first: weights[first]}, tmp_path / "partial.pth")
    bad = load_consortium(_consortium(tmp_path, {"name": "flexible_unet", "args": {"backbone": backbone},
                                                 "pretrained_weights": "partial.pth"}))
    with pytest.raises(ConfigError, match=r"c.yaml: model.pretrained_weights: .*partial.pth: lacks the backbone's "):
        initial_model(bad)


# ----------------------------------------------------------------------------- base checkpoints


def _unet(channels=(8, 16, 32), in_channels=1) -> ModelConfig:
    return ModelConfig(channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=1,
                       in_channels=in_channels)


def _bundle(folder: Path, state: dict | None, torchscript: bool = False) -> Path:
    """A MONAI bundle folder as a hospital or `fl-server export` would have one."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "network_data_format": {}}))
    if state is not None:
        torch.save(state, folder / "models" / "model.pt")
    if torchscript:
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(folder / "models" / "model.ts"))
    return folder


def _base_consortium(tmp_path: Path, base: Path, channels=(8, 16, 32)) -> Path:
    model = {"name": "unet", "channels": list(channels), "strides": [2] * (len(channels) - 1), "num_res_units": 1}
    return _consortium(tmp_path, model, f"base_checkpoint: {base}\nsupervised: {{rounds: 0}}\n")


def test_base_checkpoint_accepts_ours_a_plain_state_dict_and_a_bundle(tmp_path):
    seed_everything(3)
    state = load_model(_unet()).state_dict()
    torch.save({"state_dict": state, "round": 2}, tmp_path / "ours.pt")
    torch.save(state, tmp_path / "plain.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "parallel.pt")
    bundle = _bundle(tmp_path / "bundle", state, torchscript=True)  # model.ts beside model.pt is fine
    for base in ("ours.pt", "plain.pt", "parallel.pt", "bundle"):
        cfg = load_consortium(_base_consortium(tmp_path, tmp_path / base))
        loaded = initial_model(cfg).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), base
    assert load_state(bundle).keys() == state.keys()  # also where the run reads base_checkpoint again


def test_a_torchscript_only_bundle_is_refused_in_one_line(tmp_path):
    bundle = _bundle(tmp_path / "b", None, torchscript=True)
    with pytest.raises(ConfigError) as err:
        read_state(bundle, "c.yaml: base_checkpoint")
    assert str(err.value) == (f"c.yaml: base_checkpoint: {bundle}: the bundle has only models/model.ts, TorchScript, "
                              "which holds no state dict to train from; add models/model.pt "
                              "(torch.save(net.state_dict()))")
    with pytest.raises(ConfigError, match="TorchScript, which holds no state dict"):
        read_state(bundle / "models" / "model.ts")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="a folder but not a MONAI bundle"):
        read_state(tmp_path / "plain")


def test_a_mismatching_base_checkpoint_stops_the_run_before_any_round(tmp_path):
    from fl_server.federation import run_federation

    torch.save(load_model(_unet(in_channels=3)).state_dict(), tmp_path / "rgb.pt")
    cfg = load_consortium(_base_consortium(tmp_path, tmp_path / "rgb.pt"))
    with pytest.raises(ConfigError) as err:
        run_federation(None, cfg, tmp_path / "run")  # the grid is never reached
    assert str(err.value) == (
        f"{tmp_path / 'c.yaml'}: base_checkpoint: {tmp_path / 'rgb.pt'} does not fit the configured network "
        "unet(in_channels=1, channels=[8, 16, 32], strides=[2, 2], num_res_units=1, dropout=0.1): "
        "'model.0.conv.unit0.conv.weight' is (8, 3, 3, 3) in the file but (8, 1, 3, 3) in the network")
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))

    _bundle(tmp_path / "small", load_model(_unet(channels=(8, 16))).state_dict())
    with pytest.raises(ConfigError, match=r"small does not fit the configured network unet\(.*\): the file lacks "
                                          r"'model\.1\.submodule\.0\.conv\.unit0\.conv\.weight' \(shape \(16, 8, 3, 3\) in the network; "
                                          r"16 of its 26 keys missing\); the file's first key the network lacks is "):
        initial_model(load_consortium(_base_consortium(tmp_path, tmp_path / "small")))


def test_fl_sim_and_fl_client_local_refuse_a_mismatching_checkpoint_in_one_line(tmp_path, capsys):
    from fl_client import cli as client
    from fl_sim import cli as sim
    from tests.test_federation import write_consortium

    consortium = write_consortium(tmp_path, {"montgomery": "{kind: oracle}"}, supervised=0, preference=1)
    torch.save(load_model(_unet(channels=(8, 16))).state_dict(), tmp_path / "small.pt")
    consortium.write_text(consortium.read_text() + f"base_checkpoint: {tmp_path / 'small.pt'}\n")
    assert sim.main(["--consortium", str(consortium)]) == 2  # before Ray starts
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fl-sim: {consortium}: base_checkpoint: {tmp_path / 'small.pt'} does not fit") and "\n" not in err

    code = client.main(["local", "--site", str(tmp_path / "montgomery.yaml"), "--consortium", str(consortium),
                        "--checkpoint", str(tmp_path / "small.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"fl-client: --checkpoint: {tmp_path / 'small.pt'} does not fit the configured network unet(")


def test_matching_state_names_an_extra_key(tmp_path):
    cfg = _unet()
    state = dict(load_model(cfg).state_dict(), **{"head.weight": torch.zeros(2, 2)})
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"the file has 'head.weight' \(2, 2\) that the network lacks \(1 such keys\)"):
        matching_state(tmp_path / "extra.pt", load_model(cfg), cfg, "--checkpoint")


def test_the_new_model_keys_at_their_defaults_keep_cached_experiment_runs_valid():
    from benchmarks import experiments
    from shared.config import ConsortiumConfig, to_dict

    full = to_dict(ConsortiumConfig(name="c", run_dir=Path("run")))
    assert full["model"]["args"] == {} and full["model"]["pretrained_weights"] is None
    before = {k: v for k, v in full["model"].items() if k not in ("args", "pretrained_weights")}
    assert experiments._identity(full)["model"] == before  # the digest of an existing config is unchanged
    changed = dict(full, model={**full["model"], "name": "segresnet", "args": {"init_filters": 8}})
    assert experiments._identity(changed)["model"]["args"] == {"init_filters": 8}


def test_a_consortium_starts_from_a_bundle_in_the_simulation(tmp_path):
    from tests.test_federation import metric_lines, run_sim, write_consortium

    consortium = write_consortium(tmp_path, {"montgomery": "{kind: oracle}"}, supervised=0, preference=1)
    seed_everything(5)
    base = load_model(_unet()).state_dict()  # write_consortium's UNet 8-16-32
    _bundle(tmp_path / "hospital_model", base)
    consortium.write_text(consortium.read_text() + f"base_checkpoint: {tmp_path / 'hospital_model'}\n")
    run_dir = run_sim(consortium)
    assert [line["round"] for line in metric_lines(run_dir) if line["kind"] == "global"] == [1]
    payload = torch.load(run_dir / "checkpoints" / "round_001.pt", weights_only=True)
    assert payload["state_dict"].keys() == base.keys()
