"""Tests for 06_unet.py: official reference outputs, state-dict layout, attention layout,
initialization, and safe checkpoint loading/saving.

tests/data/*.npz and full_configs.json were produced by the official NVlabs/edm code
(see tests/data/README.md); nothing here is computed by the code under test.
"""
import io
import json
import math
import os
import pickle
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCES = ["ddpmpp_edm_cond_aug", "ncsnpp_ve_uncond_aug", "ddpmpp_vp_uncond", "ddpmpp_iddpm_cond_aug", "adm_edm_cond",
              "ddpmpp_skip_edm_cond"]   # the last: SongUNet's skip encoder and decoder, which no paper config uses


@pytest.fixture(scope="module")
def ch06(load):
    return load("06_unet")


def read_reference(name):
    d = np.load(os.path.join(DATA, name + ".npz"))
    config = json.loads(str(d["config_json"]))
    class_name = config.pop("precond")
    state = {k[len("state/"):]: torch.from_numpy(d[k]) for k in d.files if k.startswith("state/")}
    inputs = dict(x=torch.from_numpy(d["x"]), sigma=torch.from_numpy(d["sigma"]),
                  class_labels=torch.from_numpy(d["class_labels"]) if "class_labels" in d.files else None)
    if "augment_labels" in d.files:
        inputs["augment_labels"] = torch.from_numpy(d["augment_labels"])
    return class_name, config, state, inputs, torch.from_numpy(d["denoised"])


def assert_matches_reference(out, ref, rtol=1e-5):
    """Every sample's output within rtol of its reference, relative to the reference's largest entry."""
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = (out - ref).abs().flatten(1).amax(1)
    scale = ref.abs().flatten(1).amax(1)
    assert torch.all(err <= rtol * scale), f"relative errors {(err / scale).tolist()}"


def denoise(net, inputs):
    with torch.no_grad():
        return net(**inputs)


# ----------------------------------------------------------------------------
# Official outputs and layout.

@pytest.mark.parametrize("name", REFERENCES)
def test_reproduces_official_outputs(ch06, name):
    class_name, config, state, inputs, ref = read_reference(name)
    net = ch06.from_official_config(class_name, config).eval()
    assert type(net).__name__ == class_name
    assert type(net.model).__name__ == config["model_type"]
    mine = net.state_dict()
    assert list(mine) == list(state)  # same keys, same order
    assert all(mine[k].shape == state[k].shape for k in state)
    net.load_state_dict(state, strict=True)
    assert_matches_reference(denoise(net, inputs), ref)


def test_paper_configs_match_official_layout(ch06):
    """The three paper networks: same constructor arguments, parameter count, keys and shapes."""
    with open(os.path.join(DATA, "full_configs.json")) as f:
        official = json.load(f)
    assert set(ch06.PAPER_CONFIGS) == set(official)
    for name, entry in official.items():
        class_name, kwargs = ch06.PAPER_CONFIGS[name]
        assert (class_name, kwargs) == (entry["precond"], entry["config"])
        with torch.device("meta"):  # shapes only: no memory, no time
            net = ch06.from_official_config(class_name, kwargs)
        assert sum(p.numel() for p in net.parameters()) == entry["num_parameters"]
        assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == [(k, v) for k, v in entry["state_dict"].items()]


def test_multi_head_attention_uses_the_interleaved_qkv_layout(ch06):
    """The qkv conv's 3C channels are [head][channel][q|k|v]; attention is softmax(q.k/sqrt(d)) v per head.
    (The reference networks have one head per block, so this checks the multi-head case by hand.)"""
    torch.manual_seed(0)
    heads, d, hw = 3, 64, 5 * 4
    block = ch06.UNetBlock(heads * d, heads * d, emb_channels=8, attention=True, channels_per_head=d)
    assert block.num_heads == heads
    with torch.no_grad():
        block.qkv.weight.normal_(std=(heads * d) ** -0.5)  # q, k, v entries ~ N(0, 1): logits of order 1
        block.qkv.bias.normal_()
        x = torch.randn(2, heads * d, 5, 4)
        got = block.attention(x)
        qkv = block.qkv(x).reshape(2, heads * d * 3, hw)
        expected = torch.empty(2, heads * d, hw)
        for h in range(heads):
            channels = torch.arange(d) * 3 + h * 3 * d
            q, k, v = (qkv[:, channels + j].double() for j in range(3))   # [2, d, hw]
            w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(d), dim=2)
            expected[:, h * d:(h + 1) * d] = torch.einsum("nqk,nck->ncq", w, v).float()
    torch.testing.assert_close(got.reshape(2, heads * d, hw), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Initialization and conditioning.

def test_adm_starts_as_the_skip_connection(ch06):
    """ADM's output conv is initialized to exactly zero, so a fresh EDMPrecond returns c_skip * x."""
    torch.manual_seed(0)
    net = ch06.from_official_config("EDMPrecond", dict(img_resolution=8, img_channels=3, model_channels=64,
                                                        channel_mult=[1], num_blocks=1, attn_resolutions=[8],
                                                        model_type="DhariwalUNet")).eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(denoise(net, dict(x=x, sigma=sigma)), c_skip[:, None, None, None] * x, rtol=1e-6, atol=0)


def test_weight_init_distributions(ch06):
    """Xavier/Kaiming uniform bounds and normal standard deviations (fan_in = 400, fan_out = 600)."""
    torch.manual_seed(0)
    shape, fan_in, fan_out = [600, 400], 400, 600
    bounds = {"xavier_uniform": math.sqrt(6 / (fan_in + fan_out)), "kaiming_uniform": math.sqrt(3 / fan_in)}
    for mode, bound in bounds.items():
        w = ch06.weight_init(shape, mode, fan_in, fan_out)
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.01
    stds = {"xavier_normal": math.sqrt(2 / (fan_in + fan_out)), "kaiming_normal": math.sqrt(1 / fan_in)}
    for mode, std in stds.items():
        assert abs(ch06.weight_init(shape, mode, fan_in, fan_out).std().item() / std - 1) < 0.01


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_label_dropout_one_equals_no_class(ch06, model_type):
    """label_dropout=1 in training mode drops every class vector: same as passing all-zero labels."""
    torch.manual_seed(0)
    net = ch06.from_official_config("EDMPrecond", dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=64,
                                                        channel_mult=[1], num_blocks=1, attn_resolutions=[],
                                                        dropout=0, label_dropout=1, model_type=model_type))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    labels = torch.eye(4)[:2]
    with torch.no_grad():
        dropped = net.train()(x, sigma, labels)
        unlabelled = net.eval()(x, sigma, torch.zeros(2, 4))
        labelled = net.eval()(x, sigma, labels)
    torch.testing.assert_close(dropped, unlabelled, rtol=1e-6, atol=1e-6)
    assert (labelled - unlabelled).abs().max() > 1e-3  # the class does matter when not dropped


# ----------------------------------------------------------------------------
# Speed paths give the same numbers.

def test_channels_last_autocast_and_fp16(ch06):
    class_name, config, state, inputs, ref = read_reference("ddpmpp_vp_uncond")
    net = ch06.from_official_config(class_name, config).eval()
    net.load_state_dict(state)
    net = net.to(memory_format=torch.channels_last)
    last = dict(inputs, x=inputs["x"].contiguous(memory_format=torch.channels_last))
    assert_matches_reference(denoise(net, last), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = denoise(net, inputs)
    assert low.dtype == torch.float32
    assert_matches_reference(low, ref, rtol=0.05)  # bf16 has an 8-bit mantissa

    # The official use_fp16 path: float16 input, float32 master weights cast on the fly, float16 output.
    x, noise_labels = inputs["x"], torch.tensor([-1.0, 0.0, 0.5, 1.0])
    with torch.no_grad():
        full, half = net.model(x, noise_labels, None), net.model(x.half(), noise_labels, None)
    assert half.dtype == torch.float16
    assert ((half.float() - full).norm() / full.norm()).item() < 5e-3


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_traces_into_one_graph(ch06, model_type):
    """torch.compile can capture the whole network (no graph breaks); the eager backend keeps this fast."""
    torch.manual_seed(0)
    song = dict(embedding_type="fourier", encoder_type="residual", decoder_type="skip", resample_filter=[1, 3, 3, 1])
    model = ch06.NETWORKS[model_type](img_resolution=8, in_channels=3, out_channels=3, label_dim=2, augment_dim=9,
                                      model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4],
                                      **(song if model_type == "SongUNet" else {})).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    args = (torch.randn(2, 3, 8, 8), torch.randn(2), torch.eye(2), torch.randn(2, 9))
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args))


# ----------------------------------------------------------------------------
# Checkpoints: official pickles (safely) and our own snapshots.

def official_style_pickle(net, class_name, kwargs, module_src="# (module source)"):
    """Pickle `net` the way the official training loop does: {'ema': ..., 'loss_fn': ..., ...} where every
    network class is a torch_utils.persistence record (meta with module_src, class_name, state incl.
    _init_kwargs), ModuleDicts pickled as plain objects, tensors by ordinary pickling."""
    calls = []

    def _reconstruct_persistent_obj(meta):  # stands in for the official function while pickling only
        calls.append(meta)
        raise AssertionError("the loader must never call the official reconstruction function")

    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    package = types.ModuleType("torch_utils")
    package.persistence = persistence

    class EDMLoss:  # the official loss record's state
        def __init__(self):
            self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, torch.nn.ModuleDict) or not isinstance(obj, (torch.nn.Module, EDMLoss)):
                return NotImplemented
            state = dict(obj.__dict__)
            state.pop("init_config", None)
            state["_init_args"] = ()
            state["_init_kwargs"] = dict(kwargs) if obj is net else {}
            if "skip_scale" in state:
                state["skip_scale"] = np.float64(state["skip_scale"])  # official records hold numpy scalars
            meta = dict(type="class", version=6, module_src=module_src, class_name=type(obj).__name__, state=state)
            return _reconstruct_persistent_obj, (meta,)

    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": persistence})
    try:
        data = dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None, dataset_kwargs=dict(path="cifar10.zip", xflip=False))
        buffer = io.BytesIO()
        Pickler(buffer).dump(data)
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    assert not calls
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["ncsnpp_ve_uncond_aug", "ddpmpp_iddpm_cond_aug"])
def test_loads_official_pickle_format(ch06, name, tmp_path):
    class_name, config, state, inputs, ref = read_reference(name)
    net = ch06.from_official_config(class_name, config)
    net.load_state_dict(state)
    marker = tmp_path / "executed"
    evil_src = f"open({str(marker)!r}, 'w').write('module_src was executed')"
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(official_style_pickle(net, class_name, config, module_src=evil_src))
    assert "torch_utils" not in sys.modules  # no official code needed to load

    loaded = ch06.load_network(str(path))
    assert not marker.exists()  # the source code carried in the records is data, never run
    assert not loaded.training
    assert loaded.init_config == {"class_name": class_name, "kwargs": config}
    assert_matches_reference(denoise(loaded, inputs), ref)


def test_refuses_code_execution(ch06, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "edm-evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Payload()}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing.*system"):
        ch06.load_network(str(path))
    assert not marker.exists()


def test_corrupt_files_give_clear_errors(ch06, tmp_path):
    class_name, config, state, _, _ = read_reference("ddpmpp_vp_uncond")
    net = ch06.from_official_config(class_name, config)
    official = official_style_pickle(net, class_name, config)
    ch06.save_network(net, str(tmp_path / "ours.pt"))
    ours = (tmp_path / "ours.pt").read_bytes()
    cases = {"official.pkl": official[: len(official) // 2], "ours.pt": ours[: len(ours) // 2],
             "noise.pkl": b"\x80\x04" + os.urandom(1000)}
    for file, data in cases.items():
        (tmp_path / file).write_bytes(data)
        with pytest.raises(ValueError, match="truncated or corrupt") as error:
            ch06.load_network(str(tmp_path / file))
        assert len(str(error.value).splitlines()) == 1 and "network-snapshot-" in str(error.value)
    # Not a network file at all (an image): said so, not reported as a damaged pickle.
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "image.png")
    with pytest.raises(ValueError, match=r"image.png: not a network file \(pass .*network-snapshot-"):
        ch06.load_network(str(tmp_path / "image.png"))
    # 07's training state is a torch.save file too: name the file to pass instead.
    torch.save(dict(net=net.state_dict(), ema=net.state_dict(), cur_nimg=0), tmp_path / "training-state.pt")
    with pytest.raises(ValueError, match="training state of 07.*pass a network-snapshot-"):
        ch06.load_network(str(tmp_path / "training-state.pt"))


@pytest.mark.parametrize("change", ["delete", "extra", "rename", "reshape"])
def test_weights_that_do_not_fit_are_refused_in_one_line(ch06, tmp_path, change):
    """A snapshot or official pickle with a missing, extra, renamed or misshapen tensor must not load (a
    non-strict load would leave a layer at its random initialization and sample badly without a word)."""
    class_name, config, state, _, _ = read_reference("ddpmpp_vp_uncond")
    net = ch06.from_official_config(class_name, config)
    ch06.save_network(net, str(tmp_path / "ours.pt"))
    data = torch.load(tmp_path / "ours.pt", weights_only=True)
    sd = data["state_dict"]
    name = next(k for k in sd if k.endswith("conv.weight"))
    if change == "delete":
        del sd[name]
    elif change == "extra":
        sd["model.extra.weight"] = torch.zeros(3)
    elif change == "rename":
        sd[name.replace("conv.weight", "conv2.weight")] = sd.pop(name)
    else:
        sd[name] = sd[name][:1]
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit its configuration") as error:
        ch06.load_network(str(tmp_path / "bad.pt"))
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("change", ["delete", "extra"])
def test_official_pickle_whose_weights_do_not_fit_is_refused(ch06, tmp_path, change):
    class_name, config, _, _, _ = read_reference("ddpmpp_vp_uncond")
    net = ch06.from_official_config(class_name, config)
    conv = next(m for m in net.modules() if "weight" in m._parameters)
    if change == "delete":
        del conv._parameters["weight"]
    else:
        conv.register_buffer("stray", torch.zeros(2))
    (tmp_path / "official.pkl").write_bytes(official_style_pickle(net, class_name, config))
    with pytest.raises(ValueError, match="do not fit its configuration") as error:
        ch06.load_network(str(tmp_path / "official.pkl"))
    assert len(str(error.value).splitlines()) == 1


def test_save_network_roundtrip_and_atomicity(ch06, tmp_path, monkeypatch):
    class_name, config, state, inputs, ref = read_reference("ddpmpp_vp_uncond")
    net = ch06.from_official_config(class_name, config)
    net.load_state_dict(state)
    path = tmp_path / "network-snapshot.pt"
    ch06.save_network(net, str(path))
    assert os.listdir(tmp_path) == ["network-snapshot.pt"]

    raw = torch.load(path, weights_only=True)
    assert (raw["class_name"], raw["kwargs"]) == (class_name, {**config})
    loaded = ch06.load_network(str(path))
    assert_matches_reference(denoise(loaded, inputs), ref)

    # A save that dies midway leaves the previous snapshot intact.
    def crash(obj, f):                        # f: the file save_network writes through
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ch06.save_network(net, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["network-snapshot.pt"]
    assert_matches_reference(denoise(ch06.load_network(str(path)), inputs), ref)


def test_load_errors_are_exceptions(ch06, tmp_path):
    """Library errors raise (main() turns them into one line): a missing file, an inconsistent snapshot."""
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        ch06.load_network(str(tmp_path / "missing.pkl"))
    class_name, config, _, _, _ = read_reference("ddpmpp_vp_uncond")
    net = ch06.from_official_config(class_name, config)
    ch06.save_network(net, str(tmp_path / "ours.pt"))
    data = torch.load(tmp_path / "ours.pt", weights_only=True)
    data["kwargs"]["model_channels"] = 32                      # the weights no longer fit the configuration
    torch.save(data, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="inconsistent"):
        ch06.load_network(str(tmp_path / "mismatch.pt"))
    assert issubclass(ch06.UnsafePickleError, ValueError)     # a refused pickle is a bad file like any other


def test_unknown_names_in_a_configuration_or_a_file_are_refused_by_name(ch06, tmp_path):
    """A misspelt option must not fall through to a default layer, init or network; a file that is a dict but
    not one of ours, a persistent object other than a class, a numpy scalar that is not a number: refused."""
    for option, value in [("embedding_type", "sinusoidal"), ("encoder_type", "dense"), ("decoder_type", "residual")]:
        with pytest.raises(ValueError, match=f"{option} must be .* not '{value}'"):
            ch06.SongUNet(8, 3, 3, **{option: value})
    with pytest.raises(ValueError, match="unknown init mode 'he_normal'"):
        ch06.weight_init([2, 2], "he_normal", 2, 2)
    with pytest.raises(ValueError, match="unknown preconditioner 'FooPrecond'"):
        ch06.from_official_config("FooPrecond", {})
    with pytest.raises(ValueError, match="unknown model_type 'Transformer'; expected one of SongUNet, DhariwalUNet"):
        ch06.from_official_config("EDMPrecond", dict(img_resolution=8, img_channels=3, model_type="Transformer"))
    torch.save({"format": "something else", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not an EDM network file"):
        ch06.load_network(str(tmp_path / "other.pt"))
    with pytest.raises(ch06.UnsafePickleError, match="unsupported persistent object type 'function'"):
        ch06.persistent_record({"type": "function"})
    with pytest.raises(ch06.UnsafePickleError, match="refusing numpy scalar of dtype object"):
        ch06.numpy_scalar(np.dtype(object), b"")


def test_demo_claims_hold_at_reduced_size(ch06):
    """What this shows: most FLOPs at the two highest resolutions and in the decoder -- here on the paper's
    ladders with a quarter / a third of the channels (the shares hardly depend on the width). With equal
    channels per rung the top rung costs most; ADM, which doubles its channels from 64x64 to 32x32, spends
    more at 32x32 than at 64x64."""
    for name, width, top in [("cifar10_ddpmpp_cond", 32, ["32x32"]), ("imagenet64_adm_cond", 64, ["64x64", "32x32"])]:
        class_name, kwargs = ch06.PAPER_CONFIGS[name]
        kwargs = dict(kwargs, model_channels=width)
        params, flops, blocks = ch06.size_and_flops(class_name, kwargs)
        shares = ch06.flops_shares(blocks)
        assert sum(blocks.values()) == pytest.approx(flops, rel=0.01)   # the blocks account for the network
        assert shares["dec"] > 0.6
        assert sum(shares[res] for res in top) > 0.65
        assert shares[top[0]] > max(v for k, v in shares.items() if k not in top + ["dec"])
        if name.startswith("imagenet64"):
            assert shares["32x32"] > shares["64x64"], shares
        else:
            assert shares["32x32"] > 0.5, shares


def test_flops_are_those_of_one_image(ch06):
    """07's TFLOP/s and MFU are images/s x 3 x size_and_flops's count: it must be one image's, else MFU can pass
    100 %. PyTorch's FlopCounterMode here counts a batch of 2 built by the test; per image is half of it
    (convolutions, matmuls and attention all scale with the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(class_name, kwargs, batch):
        with torch.device("meta"):
            net = ch06.from_official_config(class_name, kwargs).eval()
            x, sigma = torch.zeros(batch, net.img_channels, net.img_resolution, net.img_resolution), torch.ones(batch)
            labels = torch.zeros(batch, net.label_dim) if net.label_dim else None
            augment = net.model.map_augment
            extra = {} if augment is None else {"augment_labels": torch.zeros(batch, augment.in_features)}
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                net(x, sigma, labels, **extra)
        return counter.get_total_flops()

    class_name, kwargs = ch06.PAPER_CONFIGS["cifar10_ddpmpp_cond"]      # labels, augment labels, attention
    kwargs = dict(kwargs, model_channels=16, channel_mult=[1, 2], num_blocks=1, img_resolution=16)
    assert ch06.size_and_flops(class_name, kwargs)[1] == counted(class_name, kwargs, 2) / 2 > 0


def bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x04not a pickle")
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": os.system}))
    cases = [["--batch", "0"], ["--iters", "four"], ["--bat", "2"],
             ["--load", str(tmp_path / "missing.pkl")], ["--load", str(corrupt)], ["--load", str(evil)]]
    return cases + ([] if torch.cuda.is_available() else [["--device", "cuda"]])


def test_command_line_errors_are_one_line(tmp_path, assert_one_line_errors):
    """Each bad input: a non-zero exit, exactly one "error:" line, no traceback, nothing written."""
    assert_one_line_errors("06_unet.py", bad_inputs(tmp_path), tmp_path, outdir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
