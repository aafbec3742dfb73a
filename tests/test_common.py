"""common.py's small pieces that every image passes through."""
import torch

import common


def test_to_uint8_quantizes_as_the_official_generate():
    """float [-1, 1] -> uint8 as the official generate.py writes PNGs: x * 127.5 + 128, clipped to [0, 255],
    then truncated (so 0 -> 128 and 1 -> 255; half a grey level of bias anywhere changes a value here)."""
    x = torch.tensor([-1.5, -1.0, -0.999, -0.5, -0.004, 0.0, 0.004, 0.5, 0.996, 1.0, 1.5], dtype=torch.float32)
    expected = [0, 0, 0, 64, 127, 128, 128, 191, 254, 255, 255]
    got = common.to_uint8(x.view(1, 1, 1, -1).expand(1, 3, 1, -1))
    assert got.dtype == torch.uint8 and got.shape == (1, 1, len(x), 3)       # NCHW -> NHWC
    assert got[0, 0, :, 0].tolist() == expected and (got[..., 0] == got[..., 2]).all()


class Labelled:
    """D(x; sigma) = x / (1 + sigma^2), the exact denoiser of N(0, 1) data, recording the class labels of
    every call (sigma 0-d or one per image)."""

    def __init__(self):
        self.labels, self.sigma_shapes = [], []

    def __call__(self, x, sigma, class_labels=None):
        self.labels.append(class_labels)
        self.sigma_shapes.append(torch.as_tensor(sigma).shape)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x / (1 + sigma ** 2)


def test_every_sampler_hands_extra_args_to_every_denoiser_call():
    # The calling contract of 02/03/04/09/10 (k-diffusion's; common.py): sampler(model, x, sigmas, extra_args) and
    # model(x, sigma, **extra_args) on EVERY call, sigma a 0-d tensor. A call
    # that forgets them makes a class-conditional network unconditional for that step only: images change,
    # nothing fails.
    load = common.load
    ode, heun, sampler, fast, guidance = (load(n) for n in ("02_ode_sampler", "03_heun_and_schedules",
                                          "04_stochastic_sampler", "09_fast_samplers", "10_guidance"))
    labels = torch.eye(3)[[0, 2]]
    extra = {"class_labels": labels}
    latents = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    x = latents * sigmas[0]                 # the noisy images at sigmas[0]: every sampler's starting point
    vp = heun.make_sampler(3, discretization="vp", schedule="vp", scaling="vp")
    runs = {
        "02 euler_sampler": lambda D: ode.euler_sampler(D, x, sigmas, extra),
        "02 euler_sampler, VP": lambda D: ode.euler_sampler(D, x, sigmas, extra, f=ode.VP()),
        "03 heun": lambda D: heun.heun(D, x, sigmas, ode.EDM(), extra),
        "03 ablation_sampler": lambda D: heun.ablation_sampler(D, x, sigmas, extra, S_churn=1),
        "03 ablation_sampler, VP": lambda D: vp(D, latents, extra),
        "04 edm_sampler": lambda D: sampler.edm_sampler(common.CountingDenoiser(D), x, sigmas, extra, S_churn=1),
        "04 sde_sampler": lambda D: sampler.sde_sampler(D, x, sigmas, extra),
        **{f"09 {name}": lambda D, name=name: fast.SOLVERS[name].sample(D, x, sigmas, extra) for name in fast.SOLVERS},
        "10 autoguidance": lambda D: sampler.edm_sampler(guidance.guided(D, 2.0, D), x, sigmas, extra),
    }
    for name, run in runs.items():
        D = Labelled()
        run(D)
        assert len(D.labels) >= 3 and all(l is not None and torch.equal(l, labels) for l in D.labels), name
        assert set(D.sigma_shapes) == {torch.Size([])}, (name, D.sigma_shapes)     # sigma passed one way: 0-d
    D = Labelled()                          # CFG: the guide is the same network given the zero class vector
    sampler.edm_sampler(guidance.guided(D, 2.0), x, sigmas, extra)
    assert [torch.equal(l, labels) for l in D.labels] == [True, False] * (len(D.labels) // 2)
    assert all(torch.equal(l, torch.zeros_like(labels)) for l in D.labels[1::2])


class Scaled(torch.nn.Module):
    """A network with parameters of one dtype: D = scale x / (1 + sigma^2), recording its inputs' dtypes."""

    def __init__(self, dtype):
        super().__init__()
        self.scale, self.seen = torch.nn.Parameter(torch.ones([], dtype=dtype)), []

    def forward(self, x, sigma, class_labels=None):
        self.seen.append((x.dtype, sigma.dtype))
        return self.scale * x / (1 + sigma ** 2)


def test_denoise_feeds_a_network_its_own_dtype_and_returns_float64():
    x, sigma = torch.full([2, 1, 2, 2], 0.3, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        net = Scaled(dtype)
        out = common.denoise(net, x, sigma)
        assert net.seen == [(dtype, dtype)] and out.dtype == torch.float64, dtype
        assert torch.allclose(out, x / 5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6), dtype
    exact = Labelled()                      # no parameters: the sampler's float64 goes in unchanged
    assert torch.equal(common.denoise(exact, x, sigma, {"class_labels": None}), x / 5)
    x32 = common.load("04_stochastic_sampler").make_sampler(3)(Scaled(torch.float32), x)
    assert x32.dtype == torch.float64


def test_counting_denoiser_measures_images_per_call_exactly():
    # NFE = network evaluations of images / images: whole when every image took every step, a fraction when
    # some did not (e.g. a guide evaluated only on the rows inside its interval); never rounded.
    counter = common.CountingDenoiser(Labelled())
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    for _ in range(5):
        counter(x, torch.tensor(1.0), class_labels=None)
    assert counter.evaluations == 15 and counter.per_image(3) == 5 and isinstance(counter.per_image(3), int)
    counter(x[:1], torch.tensor(1.0))
    assert counter.evaluations == 16 and counter.per_image(3) == 16 / 3


def test_number_list_is_the_one_list_parser():
    """'a,b,c' with every item checked; '' is the empty list only where allowed; 'a-b' ranges for seed lists."""
    import argparse
    import pytest
    floats, seeds = common.number_list(float, 0, 1), common.number_list(int, 0, ranges=True)
    assert floats("0.05, 0.1") == [0.05, 0.1] and seeds("0,5,7-9") == [0, 5, 7, 8, 9] and seeds("3-3") == [3]
    assert common.number_list(int, 1, empty=True)("") == [] and common.number_list(int, 1, empty=True)("2,4") == [2, 4]
    for parse, bad, complaint in [(floats, "", "expected a number, got ''"), (floats, "0.1,,0.2", "got ''"),
                                  (floats, "0.5,2", "must be in [0, 1], got 2"), (seeds, "9-5", "runs backwards"),
                                  (seeds, "1-2-3", "expected an integer"), (seeds, "-1", "must be >= 0"),
                                  (floats, "0-1", "expected a number")]:   # ranges only where asked
        with pytest.raises(argparse.ArgumentTypeError, match=complaint.replace("[", r"\[")):
            parse(bad)
    for parse in (common.number(float), common.number(float, 0), common.number(float, None, 1)):
        with pytest.raises(argparse.ArgumentTypeError, match="got nan"):   # NaN passes every comparison
            parse("nan")


def test_load_names_a_missing_chapter_and_leaves_no_half_imported_one(tmp_path, monkeypatch):
    """A copier who forgot a file gets its name and the Copy table; a chapter whose import fails is not left in
    sys.modules half-built (the next load retries it instead of handing out a module without its functions)."""
    import sys
    import pytest
    monkeypatch.setattr(common, "ROOT", str(tmp_path))
    with pytest.raises(ImportError, match=r"98_nowhere\.py is missing: copy it next to common\.py"):
        common.load("98_nowhere")
    (tmp_path / "98_broken.py").write_text("VALUE = 1\nraise RuntimeError('broken at import')\n")
    with pytest.raises(RuntimeError, match="broken at import"):
        common.load("98_broken")
    assert "98_broken" not in sys.modules
    (tmp_path / "98_broken.py").write_text("VALUE = 2\n")
    try:
        assert common.load("98_broken").VALUE == 2 and common.load("98_broken") is sys.modules["98_broken"]
    finally:
        sys.modules.pop("98_broken", None)


def test_seed_generators_refuse_a_batch_of_another_size():
    import pytest
    rnd = common.StackedRandomGenerator("cpu", [1, 2])
    assert rnd.randn([2, 3]).shape == (2, 3)
    for rows in (1, 3):
        with pytest.raises(ValueError, match=f"batch size {rows} does not match the 2 seeds"):
            rnd.randn([rows, 3])


def test_get_device_errors_are_one_sentence(monkeypatch):
    import pytest
    assert common.get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"):
        common.get_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.get_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:1 requested but CUDA is not available"):
        common.get_device("cuda:1")


def test_download_uses_the_cache_and_names_where_to_put_the_file_offline(tmp_path, monkeypatch):
    """Offline (this machine, clusters without internet): one error naming the URL and the cache path to fill
    by hand; once the file is there, nothing is downloaded."""
    import os
    import pytest
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    url = "http://127.0.0.1:9/weights/net.pkl"                 # port 9 (discard): refused at once
    cached = os.path.join(str(tmp_path), "checkpoints", "net.pkl")
    with pytest.raises(OSError, match=f"cannot download the network from {url} .*put it at {cached}"):
        common.download(url, "the network")
    assert not os.path.exists(cached)
    with open(cached, "wb") as f:
        f.write(b"weights")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded again"))
    assert common.download(url, "the network") == cached
def test_randn_like_draws_each_seeds_noise_in_the_inputs_dtype():
    # The official StackedRandomGenerator.randn_like: row i is seed i's draw in the dtype of the input, so Algorithm
    # 2's churn noise on the float64 state is the float64 draw (a float32 draw is another, coarser sequence).
    seeds = [3, 1_000_003]
    for dtype in (torch.float64, torch.float32):
        noise = common.StackedRandomGenerator("cpu", seeds).randn_like(torch.zeros(2, 3, 4, 4, dtype=dtype))
        assert noise.dtype == dtype and noise.shape == (2, 3, 4, 4)
        for row, seed in zip(noise, seeds):
            assert torch.equal(row, torch.randn([3, 4, 4], generator=torch.Generator().manual_seed(seed), dtype=dtype))

    # Through 04's sampler: every churn step's noise is the seed's next float64 draw, row by row.
    rnd, drawn = common.StackedRandomGenerator("cpu", seeds), []
    latents = torch.ones(2, 3, 4, 4, dtype=torch.float64)

    def randn_like(x):
        drawn.append(rnd.randn_like(x))
        return drawn[-1]
    common.load("04_stochastic_sampler").make_sampler(num_steps=4, S_churn=10)(Labelled(), latents, None, randn_like)
    assert len(drawn) == 4                  # one per step (S_min = 0, S_max = inf)
    for i, seed in enumerate(seeds):
        official = torch.Generator().manual_seed(seed)
        for noise in drawn:
            assert noise.dtype == torch.float64
            assert torch.equal(noise[i], torch.randn([3, 4, 4], generator=official, dtype=torch.float64))


def test_rank0_first_lets_the_first_process_of_every_node_go_first(monkeypatch):
    # torchrun on two nodes of two processes: ranks 0 and 2 are their node's LOCAL_RANK 0. Each fills its node's
    # cache (a download) while the node's other processes wait at a barrier; the barrier is then released by it.
    # Faked in-process: no process group, barrier records when it is reached.
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: calls.append("barrier"))
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 4)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for rank, local_rank, order in [(0, 0, ["fn", "barrier"]), (1, 1, ["barrier", "fn"]),
                                    (2, 0, ["fn", "barrier"]), (3, 1, ["barrier", "fn"])]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setattr(dist, "get_rank", lambda *args, rank=rank, **kwargs: rank)
        calls.clear()
        assert common.rank0_first(lambda a, b: calls.append("fn") or a + b, 2, 3) == 5
        assert calls == order, (rank, local_rank)

    # Plain python (no torchrun): just the call.
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    calls.clear()
    assert common.rank0_first(lambda: calls.append("fn") or 7) == 7 and calls == ["fn"]
