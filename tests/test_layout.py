"""The shape the project keeps (issue 27): each chapter's concept on its first screen, and copies that carry
only what they use."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The definition a reader opens each chapter for: it must start on the first screen, within FIRST_SCREEN lines
# (a short docstring, the imports, then the concept).
FIRST_SCREEN = 60
FIRST_CONCEPT = {
    "01_toy_1d": "GaussianMixture1D",          # p(x; sigma), score, exact denoiser (Sec. 2, Eq. 2-3)
    "02_ode_sampler": "Formulation",           # sigma(t), s(t) of Table 1, then Eq. 4
    "03_heun_and_schedules": "heun",           # Algorithm 1
    "04_stochastic_sampler": "edm_sampler",    # Algorithm 2
    "05_preconditioning": "Precond",           # Eq. 7
    "06_unet": "SongUNet",                     # DDPM++ / NCSN++
    "07_train_cifar10": "train",               # the training loop
    "08_evaluate_fid": "generate_batch",       # seed-exact generation, the protocol's first step
    "09_fast_samplers": "sample_euler",        # the solvers, baselines first
    "10_guidance": "GuidedDenoiser",           # D_w = D_guide + w (D_main - D_guide)
    "11_post_hoc_ema": "profile",              # the power-function EMA profile
    "12_consistency_models": "ConsistencyPrecond",   # f(x; sigma) with the boundary condition f(x; sigma_min) = x
}


def definitions(chapter):
    """{name: first line} of the chapter's top-level functions and classes."""
    tree = ast.parse(open(os.path.join(ROOT, chapter + ".py")).read())
    return {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("chapter", sorted(FIRST_CONCEPT))
def test_the_concept_starts_on_the_first_screen(chapter):
    lines = definitions(chapter)
    name = FIRST_CONCEPT[chapter]
    assert name in lines, f"{chapter}.py has no top-level {name} (update FIRST_CONCEPT if it was renamed)"
    assert lines[name] <= FIRST_SCREEN, f"{chapter}.py: {name} starts at line {lines[name]}, past the first screen"


def test_every_chapter_is_listed():
    chapters = sorted(f[:-3] for f in os.listdir(ROOT) if f[:2].isdigit() and f.endswith(".py"))
    assert chapters == sorted(FIRST_CONCEPT)


# What a copy carries (README's Copy table): the files of a row, in lines, at most this many.
COPY_BARS = {
    ("04_stochastic_sampler.py",): 500,                                           # edm_sampler
    ("08_evaluate_fid.py",): 1000,                                                # FID alone
    ("08_evaluate_fid.py", "06_unet.py", "05_preconditioning.py", "04_stochastic_sampler.py"): 3000,  # generation
    ("11_post_hoc_ema.py",): 1200,                                                # post-hoc EMA reconstruction
}


@pytest.mark.parametrize("files", list(COPY_BARS), ids=["edm_sampler", "fid_alone", "generation", "post_hoc_ema"])
def test_copies_stay_small(files):
    lines = sum(len(open(os.path.join(ROOT, f)).readlines()) for f in files + ("common.py",))
    assert lines <= COPY_BARS[files], f"{' + '.join(files)} + common.py: {lines} lines, more than {COPY_BARS[files]}"
