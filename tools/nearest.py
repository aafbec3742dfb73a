"""Did my model copy its training data? Each generated image beside its two nearest training images.

A network trained long on few images learns to reproduce them. Following Carlini et al. (2023, "Extracting
training data from diffusion models"), a generated image counts as a near-copy when its nearest training image
is much closer than the second nearest: d1 < d2 / 3 (RMS pixel distance). The ratio, not d1 alone, is the test:
a plain image is close to many training images, a copy to one.

  python tools/nearest.py --network <07 run>/network-snapshot-000016.pt --seeds 0-63 --data my_images/
  python tools/nearest.py --images out/08_evaluate_fid/images --data shapes

writes nearest.png (the most copy-like images, each beside its two nearest) and nearest.json (every image) into
out/nearest/. --data is what 07 trained on: a folder/.zip (center-cropped and resized to the generated images'
size, as 07 --resolution does), cifar10 or shapes. Both folders are read by 08's ImageFolder, as 07 reads --data;
a greyscale side is compared as RGB (repeated, lossless) when the other is RGB. Generation is 08's, seed for seed
(04's Algorithm 2).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the chapters' folder
import common  # noqa: E402

ch08 = common.load("08_evaluate_fid")

NEAR_COPY_RATIO = 3


def same_channels(*image_sets):
    """uint8 image sets [N, C, H, W] in one number of channels: a greyscale one (C = 1) repeated to the others' 3."""
    c = max(images.shape[1] for images in image_sets)
    return [images.expand(-1, c, -1, -1) for images in image_sets]


def nearest_two(images, train, chunk=4096):
    """For uint8 images [N, C, H, W]: (d [N, 2], idx [N, 2]) -- the RMS pixel distance (0-255 scale) to their two
    nearest images in `train` (a uint8 tensor or an ImageFolder) and those images' indices, nearest first."""
    best_d, best_i = torch.zeros([len(images), 0], dtype=torch.float64), torch.zeros([len(images), 0], dtype=torch.long)
    for start in range(0, len(train), chunk):
        idx = torch.arange(start, min(start + chunk, len(train)))
        x, t = (a.flatten(1).to(torch.float64) for a in same_channels(images, ch08.images_at(train, idx)))
        d = torch.cdist(x, t) / x.shape[1] ** 0.5
        best_d, order = torch.cat([best_d, d], 1).topk(2, dim=1, largest=False)
        best_i = torch.cat([best_i, idx.expand(len(x), -1)], 1).gather(1, order)
    return best_d, best_i


def near_copies(d):
    """Which rows of nearest_two's distances are near-copies: d1 < d2 / 3."""
    return d[:, 0] < d[:, 1] / NEAR_COPY_RATIO


def training_images(spec, data_dir, resolution):
    """--data: what 07 trained on -- cifar10, shapes (07's built-in set, re-drawn) or a folder/.zip, center-cropped
    and resized to the generated images' resolution as 07 --resolution does."""
    if spec in ("shapes", "cifar10"):
        ch07 = common.load("07_train_cifar10")
        return ch07.make_shapes_dataset(4096, resolution)[0] if spec == "shapes" else ch07.load_cifar10(data_dir)[0]
    return ch08.ImageFolder(spec, resolution)


def inputs(args):
    """(names, uint8 images [N, C, H, W], training images); every check before anything is written."""
    if not args.data:
        raise ValueError("nearest needs --data: the training images (a folder/.zip, cifar10 or shapes)")
    if (args.network is None) == (args.images is None):
        raise ValueError("nearest needs either --network SNAPSHOT (to generate --seeds) or --images DIR")
    folder = ch08.ImageFolder(args.images) if args.images else None
    if folder:
        images, names = folder.batch(range(len(folder))), folder.names
    else:
        device = common.get_device(args.device)
        net = ch08.load_net(args.network, device)
        sample = common.load("04_stochastic_sampler").make_sampler(args.num_steps)
        print(f"Generating {len(args.seeds)} images with 04's edm_sampler, {args.num_steps} steps...")
        images = torch.cat([ch08.generate_batch(net, batch.tolist(), device, sample).cpu()
                            for batch in torch.as_tensor(args.seeds).split(args.batch)])
        names = [f"seed {s}" for s in args.seeds]
    train = training_images(args.data, args.data_dir, images.shape[-1])
    if len(train) < 2:
        raise ValueError(f"{args.data!r} holds {len(train)} image; the check needs at least 2 training images")
    if ch08.images_at(train, [0]).shape[2:] != images.shape[2:]:
        raise ValueError(f"the training images are {tuple(ch08.images_at(train, [0]).shape[2:])} (H, W) but the "
                         f"generated ones {tuple(images.shape[2:])}; pass the --data the network was trained on")
    ch08.note_alpha(train, folder)
    return names, images, train


def nearest(args):
    names, images, train = inputs(args)
    print(f"Finding each image's 2 nearest among {len(train)} training images ({args.data})...")
    d, idx = nearest_two(images, train)
    copies = near_copies(d)
    outdir = common.out_dir(__file__, args.outdir or os.path.join("out", "nearest"))
    shown = d[:, 0].div(d[:, 1]).argsort()[:args.rows]          # the most copy-like first
    grid = torch.stack(same_channels(images[shown], ch08.images_at(train, idx[shown, 0]),
                                     ch08.images_at(train, idx[shown, 1])), 1).flatten(0, 1)
    common.load("07_train_cifar10").save_grid(
        grid, os.path.join(outdir, "nearest.png"), f"near-copies (d1 < d2/{NEAR_COPY_RATIO}): {int(copies.sum())} "
        f"of {len(images)}", ncol=3, min_width=240, column_labels=["generated", "1st nearest", "2nd nearest"],
        row_labels=[f"{names[i]}: {d[i, 0]:.1f} | {d[i, 1]:.1f}" + " copy" * bool(copies[i]) for i in shown.tolist()])
    result = dict(criterion=f"d1 < d2 / {NEAR_COPY_RATIO} (Carlini et al. 2023)",
                  distance="RMS pixel difference, 0-255", near_copies=int(copies.sum()), images=len(images),
                  near_copy_fraction=float(copies.float().mean()), data=args.data,
                  source=os.path.abspath(args.network or args.images),
                  per_image=[dict(name=n, d1=float(a), d2=float(b), nearest=[int(i), int(j)], near_copy=bool(c))
                             for n, (a, b), (i, j), c in zip(names, d, idx, copies)])
    common.write_json(result, os.path.join(outdir, "nearest.json"))
    print(f"Near-copies (d1 < d2 / {NEAR_COPY_RATIO}, Carlini et al. 2023): {result['near_copies']} of "
          f"{len(images)} = {result['near_copy_fraction']:.1%}; median d1 {d[:, 0].median():.1f}, d2 "
          f"{d[:, 1].median():.1f} (RMS, 0-255). Grid (the {len(shown)} most copy-like, d1 | d2 per row): "
          f"{os.path.join(outdir, 'nearest.png')}; every image: nearest.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", help="the training images: a folder/.zip, cifar10 or shapes (07's built-in set) "
                   "(required)")
    p.add_argument("--data-dir", default=None, help="where cifar-10-python.tar.gz is looked for (default: 07's "
                   "out/data)")
    p.add_argument("--images", help="a folder/.zip of images to check instead of generating with --network")
    p.add_argument("--network", help="an official .pkl or a 07 snapshot to generate --seeds with (04's edm_sampler)")
    p.add_argument("--seeds", type=common.number_list(int, 0, ranges=True), default="0-63",
                   help="with --network: the seeds to generate (default: 0-63)")
    p.add_argument("--steps", dest="num_steps", metavar="N", type=common.number(int, 2), default=18,
                   help="with --network: sampling steps (default: 18)")
    p.add_argument("--batch", type=common.number(int, 1), default=64, help="generation batch size (default: 64)")
    p.add_argument("--rows", type=common.number(int, 1), default=16,
                   help="grid rows: the most copy-like images (default: 16)")
    p.add_argument("--outdir", default=None, help="where nearest.png/.json go (default: out/nearest/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    return p.parse_args(argv)


def main(argv=None):
    common.run(nearest, parse_args(argv))


if __name__ == "__main__":
    main()
