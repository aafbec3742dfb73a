"""Every command the README gives a user names a script that exists and options that its parser accepts: a
renamed or removed option, subcommand or script fails here, not in the user's shell. (What the commands do is
tested where their chapter is; this is the README's side of it.)"""
import importlib.util
import os
import re
import shlex

import pytest

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEHOLDERS = {"<run>": "runs/x", "<07 run>": "runs/x", "XXXXXX": "000064", "<snapshot>": "s.pt", "<ref.npz>": "r.npz",
                "$i": "0", "<snapshot or official .pkl>": "s.pt"}


def readme_commands():
    """(script, argv) of each `python SCRIPT ...` or `torchrun ... SCRIPT ...` line in the README's bash blocks."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" #")[0].split("&&"):       # `a && b`: each command on its own
                for key, value in PLACEHOLDERS.items():
                    part = part.replace(key, value)
                m = re.fullmatch(r"\s*(?:\.venv/bin/)?(?:python|torchrun)\b.*?\s((?:tools/)?\w+\.py)\b(.*)", part)
                if m:
                    commands.append((m[1], shlex.split(m[2])))
    return commands


def parser_of(script):
    """The function that parses a script's command line (its parse_args), loaded as the script would be."""
    if script.startswith("tools/"):
        spec = importlib.util.spec_from_file_location("readme_" + os.path.basename(script)[:-3], os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = common.load(script[:-3])
    return module.parse_args


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_use():
    scripts = {script for script, _ in COMMANDS}
    assert {"01_toy_1d.py", "07_train_cifar10.py", "08_evaluate_fid.py", "10_guidance.py", "11_post_hoc_ema.py",
            "tools/nearest.py"} <= scripts, scripts


@pytest.mark.parametrize("script, argv", COMMANDS, ids=[f"{s} {' '.join(a)}"[:80] for s, a in COMMANDS])
def test_readme_command_parses(script, argv):
    assert os.path.isfile(os.path.join(ROOT, script)), f"the README names {script}, which does not exist"
    try:
        parser_of(script)(argv)
    except SystemExit as exit:
        pytest.fail(f"the README's `{script} {' '.join(argv)}` does not parse ({exit.code})")
