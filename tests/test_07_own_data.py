"""Training on your own data (issue 21): EDM's data constants measured and settable, carried to sampling."""
import json
import os

import pytest
import torch

SMALL = ["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "16",
         "--lr-rampup", "0.0002", "--device", "cpu", "--duration", "0.000032"]


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


def test_data_std_is_the_per_pixel_std_in_minus_one_to_one(T):
    levels = torch.arange(256, dtype=torch.uint8)                        # every grey level once per image
    images = levels.view(1, 1, 16, 16).expand(64, 3, 16, 16).clone()
    data = T.TrainingSet("ramp", images, torch.zeros([64, 0]), [], xflip=False)
    n = images.numel()                                                   # sample std of n values
    exact = ((levels.double() / 127.5 - 1).var(unbiased=False) * n / (n - 1)).sqrt().item()
    assert T.data_std(data) == pytest.approx(exact, rel=1e-9) and exact == pytest.approx(0.5796, abs=1e-4)
    binary = torch.randint(0, 2, (64, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8) * 255
    assert T.data_std(T.TrainingSet("binary", binary, torch.zeros([64, 0]), [], False)) == pytest.approx(1, abs=0.01)



def test_data_std_of_a_large_set_is_measured_on_images_spread_over_all_of_it(T):
    # A set sorted by class (here: 32 black-and-white images, then 32 grey ones) must not be measured on its
    # first class only when it is larger than max_images.
    binary = torch.randint(0, 2, (32, 3, 8, 8), generator=torch.Generator().manual_seed(1)).to(torch.uint8) * 255
    grey = torch.full((32, 3, 8, 8), 128, dtype=torch.uint8)
    data = T.TrainingSet("sorted", torch.cat([binary, grey]), torch.zeros([64, 0]), [], xflip=False)
    everything = T.data_std(data)                         # 64 images <= max_images: all of them
    assert everything == pytest.approx(0.5 ** 0.5, abs=0.02)
    assert T.data_std(data, max_images=8) == pytest.approx(everything, abs=0.02)       # 4 of each half

def test_sigma_data_p_mean_p_std_reach_the_loss_the_network_and_the_snapshot(T, load, tmp_path, capsys, one_thread):
    args = T.parse_args(SMALL + ["--sigma-data", "0.3", "--P-mean", "-0.8", "--P-std", "1.5"])
    loss = T.loss_function(args)
    assert (loss.sigma_data, loss.P_mean, loss.P_std) == (0.3, -0.8, 1.5)
    defaults = T.loss_function(T.parse_args(SMALL))                     # the presets keep the paper's values
    assert (defaults.sigma_data, defaults.P_mean, defaults.P_std) == (0.5, -1.2, 1.2)

    T.main(SMALL + ["--sigma-data", "0.3", "--outdir", str(tmp_path)])
    printed = capsys.readouterr()
    with open(tmp_path / "training_options.json") as f:
        options = json.load(f)
    assert options["sigma_data"] == 0.3 and options["network"]["kwargs"]["sigma_data"] == 0.3
    assert f"per-pixel std {options['data_std']:.3f}" in printed.out
    assert "warning:" in printed.err and "--sigma-data 0.45" in printed.err      # shapes: std 0.448, not 0.3
    net = load("06_unet").load_network(str(tmp_path / "network-snapshot-000000.pt"))
    assert net.sigma_data == 0.3
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.4, 2.0])
    c_skip, c_out, c_in, _ = net.scalings(sigma.view(-1, 1, 1, 1))      # Table 1's EDM column with sigma_data 0.3
    torch.testing.assert_close(c_skip.flatten(), 0.09 / (sigma ** 2 + 0.09))


def test_no_warning_when_sigma_data_fits(T, tmp_path, capsys, one_thread):
    T.main(SMALL + ["--sigma-data", "0.45", "--outdir", str(tmp_path)])
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--sigma-data", "--P-mean", "--P-std"])
def test_edm_constants_with_another_preconditioning_are_one_error_line(T, option):
    # VP/VE/iDDPM have their own noise distributions and no sigma_data: any of EDM's three would be ignored.
    with pytest.raises(SystemExit, match=f"error: --sigma-data, --P-mean and --P-std are EDM's constants; "
                                         f"--precond vp has its own"):
        T.parse_args(SMALL + ["--precond", "vp", option, "0.7"])
    T.parse_args(SMALL + ["--precond", "vp"])            # the defaults are not a complaint
