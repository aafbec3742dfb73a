"""07 as a user meets it: bad input ends in one `error:` line and changes nothing; a log file stays readable;
--help shows each preset's values; --label-dropout drops the class as often as asked."""
import io
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "07_train_cifar10.py")
SMALL = ["--preset", "tiny", "--resolution", "8", "--cbase", "8", "--cres", "1,2", "--batch", "16",
         "--lr-rampup", "0.0002", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def T(load):
    return load("07_train_cifar10")


def folder(tmp_path, name, sizes=(), garbage=False):
    path = tmp_path / name
    path.mkdir()
    for i, (w, h) in enumerate(sizes):
        PIL.Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path / f"{i}.png")
    if garbage:
        (path / "broken.png").write_bytes(b"not a png")
    return str(path)


def labelled_folder(tmp_path, labels):
    path = folder(tmp_path, "labelled", [(8, 8)] * len(labels))
    (tmp_path / "labelled" / "dataset.json").write_text(json.dumps({"labels": [[f"{i}.png", c] for i, c in
                                                                              enumerate(labels)]}))
    return path


def a_file(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    return str(tmp_path / "afile")


BAD = {   # arguments -> a fragment of the one error line
    "missing path": (lambda p: ["--data", str(p / "nowhere")], "no such folder"),
    "empty folder": (lambda p: ["--data", folder(p, "empty"), "--no-cond"], "no images"),
    "mixed sizes": (lambda p: ["--data", folder(p, "mixed", [(8, 8), (16, 8)]), "--no-cond", "--no-resize"],
                    "one size"),     # (with resizing, the default, they train: tests/test_07_own_data.py)
    "corrupt image": (lambda p: ["--data", folder(p, "bad", [(8, 8)], garbage=True), "--no-cond"], "cannot read"),
    "negative batch": (lambda p: ["--batch", "-4"], "--batch: must be >= 1, got -4"),
    "zero duration": (lambda p: ["--duration", "0"], "--duration: must be >= 1e-06"),
    "negative lr": (lambda p: ["--lr", "-1"], "--lr: must be >= 0"),
    "probability > 1": (lambda p: ["--augment", "1.5"], "--augment: must be in [0, 1]"),
    "sigma_rel twice": (lambda p: ["--phema", "0.1,0.05,0.1"], "--phema: each sigma_rel once"),
    "sigma_rel too wide": (lambda p: ["--phema", "0.05,0.3"], "--phema: must be in [1e-06, 0.288"),
    "no resolutions": (lambda p: ["--cres", ""], "--cres: expected an integer, got ''"),
    "batch-gpu not dividing": (lambda p: ["--batch", "16", "--batch-gpu", "5"], "divisible"),
    "corrupt resume state": (lambda p: ["--resume", "auto"], "cannot read training state"),
    "outdir is a file": (lambda p: ["--outdir", a_file(p)], "is (or lies inside) a file, not a folder"),
    "not the resolution": (lambda p: ["--data", folder(p, "odd", [(9, 9)]), "--no-cond", "--no-resize"],
                           "the images are 9x9; the 2-level U-Net needs square images, a size divisible by 2^1 "
                           "and equal to --resolution 8"),
    "negative label": (lambda p: ["--data", labelled_folder(p, [0, -1])], "class labels must be non-negative"),
    "dropout without classes": (lambda p: ["--label-dropout", "0.1", "--no-cond"], "--label-dropout needs --cond"),
    "resume from nowhere": (lambda p: ["--resume", str(p / "nowhere.pt")], "nowhere.pt': no such file"),
}


def damaged_run(tmp_path):
    """A run folder holding an earlier run whose training state is damaged."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "training-state.pt").write_bytes(b"truncated")
    (run / "stats.jsonl").write_text('{"kimg": 1}\n')
    return run, {f: (run / f).read_bytes() for f in os.listdir(run)}


@pytest.mark.parametrize("case", ["mixed sizes", "corrupt resume state"])   # all cases: the in-process test below
def test_bad_input_is_one_error_line_and_the_run_folder_is_untouched(tmp_path, case):
    make_args, fragment = BAD[case]
    run, before = damaged_run(tmp_path)
    result = subprocess.run([sys.executable, SCRIPT] + SMALL + ["--outdir", str(run), "--resume", "auto"] +
                            make_args(tmp_path), cwd=str(tmp_path), env=ENV, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and output.count("error:") == 1, output
    assert [l for l in output.splitlines() if l.startswith("error:")][0].find(fragment) > 0, output
    assert {f: (run / f).read_bytes() for f in os.listdir(run)} == before


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_in_process_raises_system_exit_with_one_line(T, tmp_path, case):
    make_args, fragment = BAD[case]
    run, before = damaged_run(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        T.main(SMALL + ["--outdir", str(run), "--resume", "auto"] + make_args(tmp_path))
    message = str(exit_info.value.code)
    assert message.startswith("error:") and fragment in message and "\n" not in message, message
    assert {f: (run / f).read_bytes() for f in os.listdir(run)} == before


def test_a_log_file_gets_one_short_line_per_tick_and_the_next_steps(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:   # python 07_train_cifar10.py > log.txt 2>&1
        subprocess.run([sys.executable, SCRIPT] + SMALL + ["--duration", "0.000064", "--tick", "0.016", "--snap",
                                                           "0.032", "--outdir", "run"],
                       cwd=str(tmp_path), env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=300, check=True)
    text = log.read_text()
    lines = text.splitlines()
    assert "\r" not in text and max(len(l) for l in lines) < 130, max(lines, key=len)
    ticks = [l for l in lines if l.startswith("kimg ")]
    assert len(ticks) == 4 and ticks[-1].startswith("kimg    0.064/0.064") and ticks[-1].endswith("snapshot")
    assert "What this shows" in text
    for name in ["reals.png", "preview-*.png", "network-snapshot-*.pt", "training-state.pt", "training_options.json",
                 "stats.jsonl"]:
        assert f"\n  {name} " in text, name                   # each file written is named and explained
    snapshot = os.path.join("run", "network-snapshot-000000.pt")
    assert f"python 08_evaluate_fid.py generate --network {snapshot}\n" in text
    assert f"Open {os.path.join('run', 'preview-000000.png')}" in text
    assert os.path.exists(tmp_path / snapshot)
    assert PIL.Image.open(tmp_path / "run" / "preview-000000.png").width >= 256   # enlarged for the eye


def test_a_terminal_gets_a_progress_bar_and_the_tick_lines_stay_whole(T, tmp_path, monkeypatch, capsys, one_thread):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)        # tqdm draws on stderr when it is a terminal
    T.main(SMALL + ["--duration", "0.000064", "--tick", "0.016", "--snap", "0.032", "--outdir", str(tmp_path / "run")])
    bar = terminal.getvalue()
    assert "%|" in bar and "64.0/64.0" in bar, bar       # a bar counting the images up to --duration
    lines = capsys.readouterr().out.splitlines()
    ticks = [line for line in lines if line.startswith("kimg ")]
    assert len(ticks) == 4 and ticks[-1].startswith("kimg    0.064/0.064"), lines   # whole lines on stdout


def test_help_gives_every_option_a_text_and_the_presets_defaults(T):
    for preset, batch in [("cifar10", 512), ("tiny", 32), ("imagenet64", 4096)]:
        parser = T.build_parser(preset)
        for action in parser._actions:
            assert action.help and (action.dest == "help" or "default" in action.help), action.dest
        text = parser.format_help()
        assert f"total batch size over all processes (default: {batch})" in text
    assert "run folder" in T.build_parser("tiny").format_help()
    assert T.parse_args(["--preset", "cifar10"]).batch == 512 and T.parse_args([]).batch == 32


def test_label_dropout_drops_the_class_as_often_as_asked(T, tmp_path, monkeypatch, one_thread):
    """The class vectors the network's label embedding actually receives during training: a fraction p is zero."""
    seen = []
    build = T.ch06.from_official_config

    def hooked(class_name, kwargs):
        net = build(class_name, kwargs)
        net.model.map_label.register_forward_pre_hook(
            lambda module, inputs: seen.append(inputs[0].detach().abs().sum(1) == 0) if module.training else None)
        return net
    monkeypatch.setattr(T.ch06, "from_official_config", hooked)
    p, images = 0.3, 1600
    T.main([str(a) for a in SMALL + ["--label-dropout", p, "--duration", images / 1e6, "--outdir", tmp_path / "run"]])
    dropped = torch.cat(seen)
    assert len(dropped) == images
    assert abs(dropped.float().mean().item() - p) < 4 * (p * (1 - p) / images) ** 0.5   # 4 standard errors
    # ... drawn per image, not once per batch (the rate above assumes independent images): in a batch of 16
    # at p = 0.3 all images share one fate with probability 0.3^16 + 0.7^16 < 0.004.
    mixed = sum(0 < batch.sum() < len(batch) for batch in seen)
    assert mixed >= 0.9 * len(seen), f"only {mixed} of {len(seen)} batches had both dropped and kept labels"
    with open(tmp_path / "run" / "training_options.json") as f:
        options = json.load(f)
    assert options["label_dropout"] == p and options["network"]["kwargs"]["label_dropout"] == p
    seen.clear()
    T.main(SMALL + ["--duration", "0.00016", "--outdir", str(tmp_path / "run0")])           # the default: never
    assert len(seen) == 10 and not torch.cat(seen).any()


def test_resume_takes_a_state_file_and_refuses_other_options(T, tmp_path):
    """--resume PATH continues from that file; a state saved with other options (the model, the loss, the data)
    is refused naming each one (only the length, the output schedule and the batch split may change)."""
    args = T.parse_args(SMALL + ["--outdir", str(tmp_path / "new"), "--lr", "0.01"])
    torch.save({"cur_nimg": 64, "args": dict(vars(args), lr=0.02, cbase=16, duration=5.0)}, tmp_path / "state.pt")
    args.resume = str(tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"cannot resume with different --cbase \(16 -> 8\), --lr \(0.02 -> 0.01\)$"):
        T.find_resume(args)
    torch.save({"cur_nimg": 64, "args": dict(vars(args), duration=5.0)}, tmp_path / "state.pt")
    state, path = T.find_resume(args)
    assert (state["cur_nimg"], path) == (64, str(tmp_path / "state.pt"))


def test_ctrl_c_before_the_first_state_says_there_is_nothing_to_resume(T, tmp_path, monkeypatch, capsys):
    def interrupt(args, device):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "train", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        T.main(SMALL + ["--outdir", str(tmp_path / "run")])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == (f"interrupted before the first training state was saved in "
                                               f"{tmp_path / 'run'}; nothing to resume")


def test_ranks_that_disagree_on_the_weights_stop_before_anything_is_saved(T, tmp_path, monkeypatch):
    run = types.SimpleNamespace(net=torch.nn.Linear(2, 2), ema=torch.nn.Linear(2, 2), phema={},
                                args=types.SimpleNamespace(outdir=str(tmp_path)))
    monkeypatch.setattr(T.common, "gather", lambda digest: [digest, "another/digest"])
    with pytest.raises(RuntimeError, match="ranks disagree on the weights at 640 images"):
        T.save_snapshot(run, 640)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_prints_one_line_with_the_saved_state_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    argv = SMALL + ["--duration", "1", "--tick", "0.016", "--snap", "0.016", "--outdir", str(out)]
    # The child gets SIGINT's default disposition, as a terminal's Ctrl-C would find it: a suite started as a
    # background job of a script (`cmd &`) inherits SIGINT *ignored*, and Python then installs no
    # KeyboardInterrupt handler at all, so the signal would go unheard and training would run on.
    proc = subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while not (out / "training-state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    text = stdout + stderr
    assert proc.returncode == 130 and "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "interrupted" in line]
    assert len(lines) == 1, text
    assert f"the last saved state is {out / 'training-state.pt'}" in lines[0]
    assert lines[0].endswith("--resume auto") and f"--outdir {out}" in lines[0], lines[0]
    assert torch.load(out / "training-state.pt", weights_only=True)["cur_nimg"] > 0   # intact
