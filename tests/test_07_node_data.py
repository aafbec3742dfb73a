"""07's data under torchrun (issue 18): each node's first process downloads CIFAR-10 while the node's other
processes wait, and decodes a folder's images once into a file that the others memory-map. Two ranks on gloo,
one node (the test file is also the ranks' script)."""
import os
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_main(tmp):
    """Each rank: CIFAR-10 through 07's load_dataset (a stand-in loader that records the order of calls), then
    the folder through decode_once_per_node, with decoding made impossible on local rank 1."""
    sys.path.insert(0, ROOT)
    import common
    T = common.load("07_train_cifar10")
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    marker = os.path.join(tmp, "downloaded")

    def fake_cifar10(data_dir):          # rank 0 "downloads" slowly; rank 1 must find the download finished
        at_call.append(os.path.exists(marker))
        if rank == 0:
            time.sleep(1)
            open(marker, "w").close()
        return torch.zeros([4, 3, 8, 8], dtype=torch.uint8), np.arange(4) % 2
    T.load_cifar10, at_call = fake_cifar10, []
    T.load_dataset(T.parse_args(["--data", "cifar10", "--cres", "1,2", "--data-dir", tmp]))
    folder = common.load("08_evaluate_fid").ImageFolder(os.path.join(tmp, "data"))
    if rank == 1:
        folder.read = None               # rank 1 decoding anything fails: it must map rank 0's file
    images = T.decode_once_per_node(folder, os.path.join(tmp, "run"))
    torch.save(dict(images=images.clone(), marker_at_call=at_call, writeable=images.numpy().flags.writeable), os.path.join(tmp, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_one_download_and_one_decode_per_node(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "data")
    for i, a in enumerate(arrays):
        PIL.Image.fromarray(a).save(tmp_path / "data" / f"{i}.png")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(command, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["marker_at_call"] == [False] and ranks[1]["marker_at_call"] == [True]   # rank 1 waited
    expected = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    for r in ranks:
        assert torch.equal(r["images"], expected) and r["writeable"]
    assert os.listdir(tmp_path / "run") == []       # the cache's name is gone once every rank has mapped it


if __name__ == "__main__":
    rank_main(sys.argv[1])
