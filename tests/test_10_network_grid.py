"""10's network mode: the grid's rows are 08's seed-only images under CFG / autoguidance, a guide equal
to the main network changes nothing, and what cannot be guided ends in one error line."""
import re

import PIL.Image
import pytest
import torch


@pytest.fixture(scope="module")
def m(load):
    return load("10_guidance")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def save_net(load, path, label_dim):
    """A small EDM network (05 + 06) with random weights large enough that the class matters, as a 07 snapshot."""
    unet = load("06_unet")
    torch.manual_seed(0)
    net = unet.from_official_config("EDMPrecond", dict(
        img_resolution=8, img_channels=3, label_dim=label_dim, model_channels=16, channel_mult=[1], num_blocks=1,
        attn_resolutions=[], dropout=0, model_type="SongUNet"))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    unet.save_network(net, str(path))
    return str(path)


def test_grid_rows_are_08s_images_and_a_guide_equal_to_main_changes_nothing(m, load, tmp_path, capsys):
    main = save_net(load, tmp_path / "network-snapshot-000064.pt", label_dim=4)
    rows = m.network_grid(m.parse_args(["--network", main, "--guide-network", main, "--seeds", "3-7",
                                        "--network-steps", "3", "--outdir", str(tmp_path / "out")]), "cpu")
    assert list(rows) == ["unguided (w = 1)", "CFG, w = 1.5", "CFG, w = 2", "CFG, w = 3",
                          "autoguidance, w = 1.5", "autoguidance, w = 2", "autoguidance, w = 3"]
    # Column j: seed 3 + j with class j mod 4, exactly as 08 generates it (Algorithm 2, 3 steps).
    fid = load("08_evaluate_fid")
    net = fid.load_net(main, "cpu")
    for j, seed in enumerate(range(3, 8)):
        for label, denoiser in [("unguided (w = 1)", net), ("CFG, w = 2", m.guided(net, 2))]:
            want = fid.generate_batch(denoiser, [seed], "cpu", fid.common.load("04_stochastic_sampler").make_sampler(3), j % 4)[0]
            assert torch.equal(rows[label][j], want), (label, seed)
    for w in ("1.5", "2", "3"):
        assert torch.equal(rows[f"autoguidance, w = {w}"], rows["unguided (w = 1)"])
        assert not torch.equal(rows[f"CFG, w = {w}"], rows["unguided (w = 1)"])

    out = capsys.readouterr().out
    with PIL.Image.open(tmp_path / "out" / "network_grid.png") as image:
        assert image.size[0] >= 256
    changes = dict(re.findall(r"^(\S.*?)\s{2,}([\d.]+)\s+[\d.]+$", out, re.M))
    assert float(changes["autoguidance, w = 3"]) == 0 < float(changes["CFG, w = 1.5"]) < float(changes["CFG, w = 3"])
    assert "What this shows" in out and "network_grid.png" in out


def test_unconditional_network_takes_autoguidance_only(m, load, tmp_path):
    uncond = save_net(load, tmp_path / "uncond.pt", label_dim=0)
    with pytest.raises(SystemExit) as exit_info:
        m.main(["--network", uncond, "--outdir", str(tmp_path / "out"), "--device", "cpu"])
    assert str(exit_info.value).startswith("error: ") and "class-conditional" in str(exit_info.value)
    assert "\n" not in str(exit_info.value) and not (tmp_path / "out").exists()
    rows = m.network_grid(m.parse_args(["--network", uncond, "--guide-network", uncond, "--seeds", "0,1",
                                        "--network-steps", "2", "--outdir", str(tmp_path / "out")]), "cpu")
    assert list(rows) == ["unguided (w = 1)", "autoguidance, w = 1.5", "autoguidance, w = 2", "autoguidance, w = 3"]
    with pytest.raises(SystemExit, match="error: --guide-network guides --network"):
        m.main(["--guide-network", uncond, "--device", "cpu"])


def test_class_names_come_from_the_runs_training_options(m, tmp_path):
    """Names a 07 run recorded beside its snapshots; without them (or for another class count): 'class c'."""
    snapshot = str(tmp_path / "network-snapshot-000064.pt")
    assert m.class_names(snapshot, 2) == ["class 0", "class 1"]
    (tmp_path / "training_options.json").write_text('{"class_names": ["disc", "square", "triangle", "cross"]}')
    assert m.class_names(snapshot, 4) == ["disc", "square", "triangle", "cross"]
    assert m.class_names(snapshot, 3) == ["class 0", "class 1", "class 2"]
