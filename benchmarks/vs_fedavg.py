"""ECOS against federated learning (Flower FedAvg), local-only training and uploading the data.

The devices are the benchmark's device domains (``devices/<domain>/local`` to learn from,
``devices/<domain>/test`` to test on; the data of ``benchmarks/eval_pools.py``). Every method
trains the same student, the benchmarks' small evaluation CNN (``benchmarks/classifier.py``), and
reports its accuracy on each device's own test images:

- ``ecos``: the project's round at epsilon 0.58: the cloud's probe (K centroids of its pool index)
  goes to the device; a real ``ecos-device score`` process encodes the device's local images and
  answers with noisy per-centroid counts (its privacy ledger charged); the cloud selects ``--budget``
  labelled pool images with the ECOS sampler and trains the student on them (15 epochs, as
  eval_pools does; no teacher distillation); the student is exported and quantised to int8 ONNX,
  whose size is the model download.
- ``fedavg``: Flower 1.42 FedAvg with real processes on loopback: one ``start_server`` process and
  one ``start_client`` process per device (legacy gRPC API), each client training the student on
  its own local images (1 local epoch of Adam per round) and evaluating the global model on its own
  test images every round; training stops when the mean test accuracy has not improved for
  ``--patience`` rounds (model selection on the test images: this favours FedAvg). Each client
  talks to the server through a counting TCP proxy, so the bytes are those on the wire (gRPC,
  HTTP/2, protobuf), next to the serialized parameter bytes the client sent and received.
- ``fedavg-dp`` (``--dp``): the same with Flower's local DP (the clipping and Gaussian noise of
  ``flwr.client.mod.LocalDpMod``, applied in the client) at a total epsilon of 0.58 split evenly
  over a fixed number of rounds (basic composition; delta 1e-5).
- ``local-only``: each device trains the student on its own local images (a separate process:
  CPU seconds and peak RSS are that process's).
- ``upload``: every device uploads its local images; the cloud trains the student on all of them
  pooled (the upper bound); the device sends its image files and downloads the int8 student.

Device compute: CPU seconds of the device's process (user + system, as the kernel counts them)
and multiply-accumulates (MACs): a forward pass's conv and linear MACs counted by hooks on the
torch model (``forward_macs``), a training step taken as 3 forward passes (forward + backward).
Install size: the installed files of the device's dependency closure in this venv (device-only
``ecos-fleet-device[onnx]`` against ``flwr`` + ``torch`` + numpy + Pillow).

    pip install -e '.[fedavg]'           # flwr 1.42, benchmark-only
    python benchmarks/vs_fedavg.py --workdir runs/vs-fedavg-gen --source generated --seeds 0 --dp

The work folder holds ``data/`` (generated if absent, as eval_pools does) and ``encoder/``
(``encoder.onnx``, ``pool.index.npz``, ``train.json``: trained on the unlabelled pool if absent,
else used as found, e.g. copied from an eval_pools/eval_tasks work folder on the same data).
``--client-python`` runs the FedAvg clients and the local-only trainers in another venv (e.g. one
with flwr and a CPU-only torch, as a device would have: its RSS and install size are then those
reported). On few cores the methods can run as parallel parts and be merged::

    python benchmarks/vs_fedavg.py --workdir W --methods ecos --domains a b --out W/part1.json
    python benchmarks/vs_fedavg.py --workdir W --methods fedavg --out W/part2.json    # ... one per part
    python benchmarks/vs_fedavg.py --merge W/part*.json --source generated   # -> results/vs_fedavg_generated.json
    python benchmarks/vs_fedavg.py --report benchmarks/results/vs_fedavg_generated.json \
        benchmarks/results/vs_fedavg_real.json                               # table + plot again

Writes benchmarks/results/vs_fedavg_<source>.json, docs/results/vs_fedavg.md and .png (one
section and one row of plots per benchmark JSON found).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DELTA = 1e-5
RADIUS_QUANTILE = 0.95


# ---------------------------------------------------------------- accounting (tested in tests/test_vs_fedavg.py)


def forward_macs(model, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass of one sample: Conv2d and Linear layers only.

    Conv2d: out_channels * H_out * W_out * (in_channels / groups) * kh * kw; Linear: in * out.
    Batch norm, activations, pooling and biases are left out (they are a few percent at most).
    """
    import torch
    from torch import nn

    total = [0]

    def conv_hook(mod, inp, out):
        kh, kw = mod.kernel_size
        total[0] += int(out[0].numel()) * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod, inp, out):
        total[0] += int(out[0].numel()) * mod.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total[0]


def train_macs(forward: int, samples: int, epochs: int = 1) -> int:
    """Training MACs: forward plus backward taken as three forward passes per sample and epoch."""
    return 3 * forward * samples * epochs


def flower_bytes(arrays: Iterable[np.ndarray]) -> int:
    """Bytes of the arrays as Flower serializes them (np.save per array, as ndarrays_to_parameters does)."""
    from flwr.common import ndarrays_to_parameters

    return sum(len(t) for t in ndarrays_to_parameters(list(arrays)).tensors)


def fedavg_device_macs(forward: int, client: Dict, test_images: int) -> int:
    """A FedAvg client's MACs: its local training steps in every fit round plus one forward pass per test image
    in every evaluate round."""
    return (
        train_macs(forward, client["samples"], client["local_epochs"]) * client["fit_rounds"]
        + forward * test_images * client["eval_rounds"]
    )


def folder_bytes(paths: Iterable[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def wheel_sizes(path: str) -> Dict:
    """A wheel's own size and the sum of its files' sizes once unpacked."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        requires = (
            []
            if meta is None
            else [
                line.split(":", 1)[1].strip()
                for line in z.read(meta).decode(errors="replace").splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line
            ]
        )
        return {
            "wheel_bytes": os.path.getsize(path),
            "unpacked_bytes": sum(i.file_size for i in z.infolist()),
            "cuda_requirements": [r for r in requires if "cuda" in r.lower() or "nvidia" in r.lower()],
        }


def localdp_sigma(sensitivity: float, epsilon: float, delta: float = DELTA) -> float:
    """The noise standard deviation of Flower's LocalDpMod (classic Gaussian mechanism, epsilon < 1)."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def closure_size(requirements: Sequence[str]) -> Dict:
    """Installed bytes of the distributions named and everything they require (markers evaluated), in this venv."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: Dict[str, int] = {}
    todo = [(Requirement(r), ()) for r in requirements]
    while todo:
        req, _ = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            seen[name] = -1
            continue
        size = 0
        for f in dist.files or []:
            p = f.locate()
            if os.path.isfile(p):
                size += os.path.getsize(p)
        seen[name] = size
        for spec in dist.requires or []:
            r = Requirement(spec)
            if r.marker is not None and not any(r.marker.evaluate({"extra": e}) for e in [""] + sorted(req.extras)):
                continue
            todo.append((r, ()))
    return {"bytes": sum(v for v in seen.values() if v > 0), "packages": seen}


# ---------------------------------------------------------------- byte-counting TCP proxy


class CountingProxy:
    """A loopback TCP proxy to ``target`` that counts the bytes each way (up = client to server)."""

    def __init__(self, target: Tuple[str, int]):
        self.target = target
        self.up = 0
        self.down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._sock.close()


# ---------------------------------------------------------------- data and training


def device_data(data_root: str, domain: str, labels: List[str], split: str):
    from device_sdk.imagefolder import load_images, scan_image_folder

    items = scan_image_folder(os.path.join(data_root, "devices", domain, split))
    x = load_images([t.path for t in items], (32, 32))
    y = np.array([labels.index(t.label) for t in items])
    return x, y, [t.path for t in items]


def labels_of(data_root: str) -> List[str]:
    from device_sdk.imagefolder import scan_image_folder

    first = sorted(os.listdir(os.path.join(data_root, "devices")))[0]
    return sorted({it.label for it in scan_image_folder(os.path.join(data_root, "devices", first))})


def state_arrays(model) -> List[np.ndarray]:
    return [
        v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    ]


def load_arrays(model, arrays: List[np.ndarray]) -> None:
    import torch

    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays)}, strict=False)


def local_fit(model, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, batch: int = 64, lr: float = 2e-3) -> None:
    """FedAvg's local step: Adam (fresh each round, as the Flower examples do), the eval CNN's augmentation."""
    import torch
    from torch.nn import functional as F

    from benchmarks.classifier import _prep, _shift

    gen = torch.Generator().manual_seed(seed)
    xt, yt = _prep(x), torch.from_numpy(y).long()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            loss = F.cross_entropy(model(_shift(xt[idx], gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def evaluate(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from benchmarks.classifier import _prep

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(t).argmax(1) for t in _prep(x).split(512)]).numpy()
    return float(np.mean(pred == y))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


GNU_TIME = "/usr/bin/time"


def run_child(cmd: List[str], timeout: float, env: Optional[Dict] = None, progress: str = "") -> Dict:
    """Run a process to the end: its own CPU seconds (user + system) and peak RSS.

    Linux charges a child with the peak RSS of the memory it was forked with (the parent's, here a
    big benchmark process) until it execs; so the child is started by GNU time, a small process,
    and its figures are those GNU time reads from wait4. Without GNU time, wait4 here (peak RSS
    then at least this process's, marked ``rss_inherited``).
    """
    t0 = time.time()
    fd, timing = tempfile.mkstemp(suffix=".time")
    os.close(fd)
    use_time = os.path.exists(GNU_TIME)
    full = [GNU_TIME, "-f", "%U %S %M", "-o", timing, *cmd] if use_time else cmd
    try:
        proc = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        lines = []
        for raw in proc.stdout:  # read as it comes; progress lines ("round ...") are passed on
            line = raw.decode(errors="replace")
            lines.append(line)
            if progress and line.startswith(progress):
                print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
        proc.wait()
        timer.cancel()
        text = "".join(lines[-200:])
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{text[-3000:]}")
        if use_time:
            with open(timing) as fh:
                user, system, peak_kb = fh.read().split("\n")[-2].split()
            cpu, rss, inherited = float(user) + float(system), float(peak_kb) / 1024, False
        else:
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu, rss, inherited = ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, True
    finally:
        os.unlink(timing)
    return {"cpu_s": cpu, "peak_rss_mb": rss, "wall_s": time.time() - t0, "output": text, "rss_inherited": inherited}


def child_env(threads: int) -> Dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT, GRPC_VERBOSITY="ERROR")
    return env


# ---------------------------------------------------------------- subprocess roles


def role_train(args) -> int:
    """A device training the student on its own images (local-only): accuracy, CPU and RSS of this process."""
    import torch

    from benchmarks.classifier import train_and_eval

    torch.set_num_threads(args.threads)
    labels = labels_of(args.data)
    x, y, _ = device_data(args.data, args.domain, labels, "local")
    tx, ty, _ = device_data(args.data, args.domain, labels, "test")
    c0 = cpu_seconds()
    acc = train_and_eval(x, y, tx, ty, len(labels), epochs=args.epochs, seed=args.seed)
    out = {"accuracy": acc, "train_cpu_s": cpu_seconds() - c0, "samples": len(x), "epochs": args.epochs}
    with open(args.out, "w") as fh:
        json.dump(out, fh)
    return 0


def role_client(args) -> int:
    """One Flower client process: the device's own data, FedAvg local steps, evaluation on its test images."""
    import flwr as fl
    import torch

    from benchmarks.classifier import small_cnn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    labels = labels_of(args.data)
    x, y, _ = device_data(args.data, args.domain, labels, "local")
    tx, ty, _ = device_data(args.data, args.domain, labels, "test")
    model = small_cnn(len(labels))
    stats = {
        "domain": args.domain,
        "fit_rounds": 0,
        "eval_rounds": 0,
        "param_bytes_down": 0,
        "param_bytes_up": 0,
        "fit_cpu_s": 0.0,
        "eval_cpu_s": 0.0,
        "samples": len(x),
        "local_epochs": args.local_epochs,
        "history": [],
    }
    dp = args.dp_epsilon_round > 0

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config):
            return state_arrays(model)

        def fit(self, parameters, config):
            c0 = cpu_seconds()
            stats["param_bytes_down"] += flower_bytes(parameters)
            load_arrays(model, parameters)
            rnd = int(config.get("round", 0))
            local_fit(
                model, x, y, args.local_epochs, seed=1000 * args.seed + 7 * rnd + zlib.crc32(args.domain.encode()) % 7
            )
            new = state_arrays(model)
            if dp:
                from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
                from flwr.supercore.differential_privacy import (
                    add_localdp_gaussian_noise_to_params,
                    compute_clip_model_update,
                )

                compute_clip_model_update(new, [np.asarray(p) for p in parameters], args.clip)  # as LocalDpMod
                new = parameters_to_ndarrays(
                    add_localdp_gaussian_noise_to_params(
                        ndarrays_to_parameters(new), args.clip, args.dp_epsilon_round, DELTA
                    )
                )
            stats["param_bytes_up"] += flower_bytes(new)
            stats["fit_rounds"] += 1
            stats["fit_cpu_s"] += cpu_seconds() - c0
            return new, len(x), {}

        def evaluate(self, parameters, config):
            c0 = cpu_seconds()
            stats["param_bytes_down"] += flower_bytes(parameters)
            load_arrays(model, parameters)
            acc = evaluate(model, tx, ty)
            stats["eval_rounds"] += 1
            stats["eval_cpu_s"] += cpu_seconds() - c0
            stats["history"].append(acc)
            return 0.0, len(tx), {"accuracy": acc, "domain": args.domain}

    fl.client.start_client(
        server_address=args.server, client=Client().to_client(), insecure=True, transport="grpc-bidi"
    )
    stats.update(cpu_s=cpu_seconds(), peak_rss_mb=peak_rss_mb())
    with open(args.out, "w") as fh:
        json.dump(stats, fh)
    return 0


def role_server(args) -> int:
    """The Flower server process: FedAvg over all clients, stopping once the mean test accuracy plateaus."""
    import flwr as fl
    import torch
    from flwr.common import ndarrays_to_parameters

    from benchmarks.classifier import small_cnn

    torch.manual_seed(args.seed)
    labels = labels_of(args.data)
    t0 = time.time()
    state = {"best": -1.0, "best_round": 0, "stopped_at": None, "rounds": []}

    class PlateauFedAvg(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            if state["stopped_at"] is not None:
                return []
            return [
                (c, fl.common.FitIns(ins.parameters, {"round": server_round}))
                for c, ins in super().configure_fit(server_round, parameters, client_manager)
            ]

        def configure_evaluate(self, server_round, parameters, client_manager):
            if state["stopped_at"] is not None:
                return []
            return super().configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round, results, failures):
            accs = {r.metrics["domain"]: float(r.metrics["accuracy"]) for _, r in results}
            mean = float(np.mean(list(accs.values()))) if accs else 0.0
            state["rounds"].append(
                {
                    "round": server_round,
                    "accuracy": accs,
                    "mean": mean,
                    "wall_s": time.time() - t0,
                    "failures": len(failures),
                }
            )
            print(f"round {server_round}: mean accuracy {mean:.3f} ({time.time() - t0:.0f} s)", flush=True)
            if mean > state["best"] + args.min_delta:
                state["best"], state["best_round"] = mean, server_round
            elif server_round - state["best_round"] >= args.patience:
                state["stopped_at"] = server_round
            if args.fixed_rounds:
                state["stopped_at"] = None
            return super().aggregate_evaluate(server_round, results, failures)

    strategy = PlateauFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=args.clients,
        min_evaluate_clients=args.clients,
        min_available_clients=args.clients,
        initial_parameters=ndarrays_to_parameters(state_arrays(small_cnn(len(labels)))),
        accept_failures=False,
    )
    fl.server.start_server(
        server_address=f"127.0.0.1:{args.port}",
        strategy=strategy,
        config=fl.server.ServerConfig(num_rounds=args.max_rounds),
    )
    state.update(wall_s=time.time() - t0, cpu_s=cpu_seconds(), peak_rss_mb=peak_rss_mb())
    with open(args.out, "w") as fh:
        json.dump(state, fh)
    return 0


# ---------------------------------------------------------------- the methods


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fedavg(args, domains: List[str], seed: int, dp_round_eps: float = 0.0, rounds: Optional[int] = None) -> Dict:
    from cloud.log import LOG

    py = sys.executable
    device_py = args.client_python or sys.executable
    me = os.path.abspath(__file__)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--data", args.data, "--seed", str(seed), "--threads", "1"]
        server_cmd = [
            py,
            me,
            "_server",
            *common,
            "--port",
            str(port),
            "--clients",
            str(len(domains)),
            "--max-rounds",
            str(rounds or args.max_rounds),
            "--patience",
            str(args.patience),
            "--min-delta",
            str(args.min_delta),
            "--out",
            os.path.join(tmp, "server.json"),
        ]
        if rounds:
            server_cmd.append("--fixed-rounds")
        env = child_env(1)
        results: Dict[str, Dict] = {}
        errors: List[str] = []
        server_res: Dict = {}

        def serve():
            try:
                server_res.update(run_child(server_cmd, args.timeout, env, progress="round "))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"server: {e}")

        t0 = time.time()
        threading.Thread(target=serve, daemon=True).start()
        for _ in range(600):  # the server is listening once its port takes a connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        proxies = {d: CountingProxy(("127.0.0.1", port)) for d in domains}
        threads = []
        for d in domains:
            cmd = [
                device_py,
                me,
                "_client",
                *common,
                "--domain",
                d,
                "--server",
                f"127.0.0.1:{proxies[d].port}",
                "--local-epochs",
                str(args.local_epochs),
                "--out",
                os.path.join(tmp, f"client-{d}.json"),
            ]
            if dp_round_eps:
                cmd += ["--dp-epsilon-round", str(dp_round_eps), "--clip", str(args.clip)]

            def go(d=d, cmd=cmd):
                try:
                    results[d] = run_child(cmd, args.timeout, env)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(f"client {d}: {e}")

            th = threading.Thread(target=go, daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        deadline = time.time() + 120
        while not server_res and not errors and time.time() < deadline:
            time.sleep(0.5)
        wall = time.time() - t0
        for p in proxies.values():
            p.close()
        if errors:
            raise RuntimeError("; ".join(errors))
        with open(os.path.join(tmp, "server.json")) as fh:
            server = json.load(fh)
        out = {
            "server": {
                **server,
                "process_cpu_s": server_res.get("cpu_s"),
                "process_peak_rss_mb": server_res.get("peak_rss_mb"),
            },
            "wall_s": wall,
            "devices": {},
        }
        for d in domains:
            with open(os.path.join(tmp, f"client-{d}.json")) as fh:
                c = json.load(fh)
            c.update(
                process_cpu_s=results[d]["cpu_s"],
                process_peak_rss_mb=results[d]["peak_rss_mb"],
                wire_bytes_up=proxies[d].up,
                wire_bytes_down=proxies[d].down,
                connections=proxies[d].connections,
            )
            out["devices"][d] = c
    rounds_run = [r for r in server["rounds"]]
    best = max(rounds_run, key=lambda r: r["mean"]) if rounds_run else None
    out["best_round"] = best["round"] if best else None
    out["rounds_run"] = len(rounds_run)
    LOG.info(
        "fedavg%s seed %d: %d rounds, best mean accuracy %.3f at round %s, %.0f s",
        " (dp)" if dp_round_eps else "",
        seed,
        len(rounds_run),
        best["mean"] if best else float("nan"),
        out["best_round"],
        wall,
    )
    return out


def export_student_bytes(model, labels: List[str], images: np.ndarray, folder: str) -> Dict:
    """The int8 ONNX student the device downloads (and the fp32 file before quantisation)."""
    from cloud.export.formats import export_onnx
    from cloud.export.quantize import QuantConfig, calibration_batch, quantize_onnx
    from device_sdk.runtime.artifact import ArtifactMeta

    meta = ArtifactMeta(
        kind="classifier",
        arch="eval_cnn",
        input_shape=(3, 32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        labels=list(labels),
    )
    fp32, int8 = os.path.join(folder, "student.onnx"), os.path.join(folder, "student.int8.onnx")
    model.eval()
    export_onnx(model, meta, fp32, output_name="logits")
    quant = QuantConfig()
    quantize_onnx(fp32, int8, calibration_batch(images, meta, quant), quant)
    return {"fp32_bytes": os.path.getsize(fp32), "int8_bytes": os.path.getsize(int8)}


def train_student(x, y, classes: int, epochs: int, seed: int):
    """benchmarks.classifier.train_and_eval's recipe, returning the model (for export) as well."""
    import torch
    from torch.nn import functional as F

    from benchmarks.classifier import _prep, _shift, small_cnn

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = small_cnn(classes)
    xt, yt = _prep(x), torch.from_numpy(y).long()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * ((len(xt) + 63) // 64))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            loss = F.cross_entropy(model(_shift(xt[idx], gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def run_ecos(args, index, domains: List[str], labels: List[str], seed: int, tmp: str) -> Dict:
    """The round per device: probe down, a real ``ecos-device score`` process, scores up, selection, student."""
    from cloud.log import LOG
    from cloud.sampling.selection import combine_scores, select
    from device_sdk.imagefolder import load_images, scan_image_folder
    from device_sdk.privacy.ledger import PrivacyLedger
    from device_sdk.protocol.round import Scores

    probe = index.probe(radius_quantile=RADIUS_QUANTILE)
    probe_path = os.path.join(tmp, "round.probe")
    with open(probe_path, "wb") as fh:
        fh.write(probe.to_bytes())
    out = {}
    for d in domains:
        scores_path, ledger_path = os.path.join(tmp, f"{d}-{seed}.scores"), os.path.join(tmp, f"{d}-{seed}.ledger.json")
        cmd = [
            os.path.join(os.path.dirname(sys.executable), "ecos-device"),
            "score",
            os.path.join(args.data, "devices", d, "local"),
            "--encoder",
            args.encoder,
            "--probe",
            probe_path,
            "--out",
            scores_path,
            "--ledger",
            ledger_path,
            "--epsilon",
            str(args.epsilon),
            "--device-id",
            d,
            "--threads",
            "1",
            "--accept-unsigned",
            "-q",
        ]
        proc = run_child(cmd, args.timeout, child_env(1))
        with open(scores_path, "rb") as fh:
            scores = Scores.from_bytes(fh.read())
        spent = PrivacyLedger.open(ledger_path, device_id=d).spent()[0]
        pick = select(
            index, "ecos", args.budget, combine_scores(index, [scores], RADIUS_QUANTILE), seed=seed, use_domains=False
        )
        pick = pick[np.isin(index.labels[pick], labels)]
        share = float(np.mean(index.domains[pick] == d))
        x = load_images([index.paths[i] for i in pick], (32, 32))
        y = np.array([labels.index(v) for v in index.labels[pick]])
        c0 = time.process_time()
        model = train_student(x, y, len(labels), args.epochs, seed)
        cloud_cpu = time.process_time() - c0
        tx, ty, _ = device_data(args.data, d, labels, "test")
        acc = evaluate(model, tx, ty)
        n_local = len(scan_image_folder(os.path.join(args.data, "devices", d, "local")))
        out[d] = {
            "accuracy": acc,
            "share": share,
            "selected": len(pick),
            "probe_bytes": os.path.getsize(probe_path),
            "scores_bytes": os.path.getsize(scores_path),
            "score_cpu_s": proc["cpu_s"],
            "score_peak_rss_mb": proc["peak_rss_mb"],
            "score_wall_s": proc["wall_s"],
            "epsilon_spent": spent,
            "cloud_train_cpu_s": cloud_cpu,
            "local_images": n_local,
            "student": model,
        }
        LOG.info(
            "ecos %-12s seed %d: share %.3f accuracy %.3f, scores %d B, score process %.1f CPU s %.0f MB",
            d,
            seed,
            share,
            acc,
            out[d]["scores_bytes"],
            proc["cpu_s"],
            proc["peak_rss_mb"],
        )
    return out


def run(args) -> Dict:
    import torch

    from benchmarks.classifier import small_cnn
    from benchmarks.eval_pools import encoder_and_index, ensure_data, regime_view
    from cloud.log import LOG
    from cloud.pool.dataset import load_image_set
    from cloud.training.encoder_config import EncoderConfig
    from device_sdk.imagefolder import scan_image_folder
    from models.encoder import ConvEncoder

    torch.set_num_threads(args.threads)
    args.data = ensure_data(args.workdir, args.source, False)
    domains = sorted(os.listdir(os.path.join(args.data, "devices")))
    if args.domains:
        domains = [d for d in domains if d in args.domains]
    labels = labels_of(args.data)
    folder = os.path.join(args.workdir, "encoder")
    stats_path = os.path.join(folder, "train.json")
    if all(os.path.exists(os.path.join(folder, f)) for f in ("encoder.onnx", "pool.index.npz", "train.json")):
        # an encoder and index already made for this data (e.g. by eval_pools or eval_tasks): used as they are
        from cloud.pool.index import PoolIndex

        index = PoolIndex.load(os.path.join(folder, "pool.index.npz"))
    else:
        cfg = EncoderConfig(epochs=args.encoder_epochs, seed=0)
        pool = load_image_set(scan_image_folder(os.path.join(args.data, "pool")))
        index, _, _ = encoder_and_index(folder, regime_view(pool, "unlabelled"), cfg, args.k, args.threads)
        del pool
    with open(stats_path) as fh:
        enc_stats = json.load(fh)
    args.encoder = os.path.join(folder, "encoder.onnx")
    enc = enc_stats["settings"]["encoder"]
    enc_macs = forward_macs(
        ConvEncoder(feature_dim=enc["feature_dim"], width=enc["width"], style_dim=enc.get("style_dim", 0)), (3, 32, 32)
    )
    student_macs = forward_macs(small_cnn(len(labels)), (3, 32, 32))
    student_params = sum(a.size for a in state_arrays(small_cnn(len(labels))))
    result = {
        "domains": domains,
        "labels": labels,
        "encoder_forward_macs": enc_macs,
        "student_forward_macs": student_macs,
        "student_values": student_params,
        "student_flower_bytes": flower_bytes(state_arrays(small_cnn(len(labels)))),
        "encoder_train_seconds": enc_stats.get("train_seconds"),
        "encoder_settings": enc_stats["settings"],
        "seeds": {},
    }
    n_test = {d: len(scan_image_folder(os.path.join(args.data, "devices", d, "test"))) for d in domains}
    for seed in args.seeds:
        res: Dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            if "ecos" in args.methods:
                ecos = run_ecos(args, index, domains, labels, seed, tmp)
                model = ecos[domains[0]]["student"]
                x0, _, _ = device_data(args.data, domains[0], labels, "local")
                sizes = export_student_bytes(model, labels, x0, tmp)
                for d in domains:
                    ecos[d].pop("student")
                    ecos[d]["model_download_bytes"] = sizes["int8_bytes"]
                    ecos[d]["device_macs"] = enc_macs * ecos[d]["local_images"]
                res["ecos"] = {"devices": ecos, "student_bytes": sizes}
                result["student_bytes"] = sizes
            if "local-only" in args.methods:
                local = {}
                for d in domains:
                    jp = os.path.join(tmp, f"local-{d}.json")
                    cmd = [
                        args.client_python or sys.executable,
                        os.path.abspath(__file__),
                        "_train",
                        "--data",
                        args.data,
                        "--domain",
                        d,
                        "--seed",
                        str(seed),
                        "--epochs",
                        str(args.epochs),
                        "--threads",
                        "1",
                        "--out",
                        jp,
                    ]
                    proc = run_child(cmd, args.timeout, child_env(1))
                    with open(jp) as fh:
                        r = json.load(fh)
                    r.update(
                        process_cpu_s=proc["cpu_s"],
                        peak_rss_mb=proc["peak_rss_mb"],
                        wall_s=proc["wall_s"],
                        device_macs=train_macs(student_macs, r["samples"], r["epochs"]),
                    )
                    local[d] = r
                    LOG.info(
                        "local-only %-12s seed %d: accuracy %.3f, %.1f CPU s (%.1f training), %.0f MB",
                        d,
                        seed,
                        r["accuracy"],
                        r["process_cpu_s"],
                        r["train_cpu_s"],
                        r["peak_rss_mb"],
                    )
                res["local-only"] = {"devices": local}
            if "upload" in args.methods:
                xs, ys, up = [], [], {}
                for d in domains:
                    x, y, paths = device_data(args.data, d, labels, "local")
                    xs.append(x)
                    ys.append(y)
                    up[d] = {"upload_bytes": folder_bytes(paths), "images": len(paths)}
                c0 = time.process_time()
                model = train_student(np.concatenate(xs), np.concatenate(ys), len(labels), args.epochs, seed)
                cloud_cpu = time.process_time() - c0
                for d in domains:
                    tx, ty, _ = device_data(args.data, d, labels, "test")
                    up[d]["accuracy"] = evaluate(model, tx, ty)
                    LOG.info(
                        "upload %-12s seed %d: accuracy %.3f, %d bytes up",
                        d,
                        seed,
                        up[d]["accuracy"],
                        up[d]["upload_bytes"],
                    )
                res["upload"] = {"devices": up, "cloud_train_cpu_s": cloud_cpu}
            if "fedavg" in args.methods:
                fed = run_fedavg(args, domains, seed)
                for d in domains:
                    c = fed["devices"][d]
                    c["device_macs"] = fedavg_device_macs(student_macs, c, n_test[d])
                res["fedavg"] = fed
            if args.dp:
                rounds = args.dp_rounds
                fed = run_fedavg(args, domains, seed, dp_round_eps=args.epsilon / rounds, rounds=rounds)
                fed["dp"] = {
                    "epsilon_total": args.epsilon,
                    "rounds": rounds,
                    "epsilon_round": args.epsilon / rounds,
                    "delta_round": DELTA,
                    "clip": args.clip,
                    "sigma": localdp_sigma(args.clip, args.epsilon / rounds, DELTA),
                    "composition": "basic (sum of per-round epsilons); delta adds up to rounds * 1e-5",
                }
                for d in domains:
                    c = fed["devices"][d]
                    c["device_macs"] = fedavg_device_macs(student_macs, c, n_test[d])
                res["fedavg-dp"] = fed
        result["seeds"][str(seed)] = res
    return result


def client_versions(python: str) -> Dict[str, str]:
    """The versions of torch and flwr in another venv."""
    code = "import json, torch, flwr; print(json.dumps({'torch': torch.__version__, 'flwr': flwr.__version__}))"
    text = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(text.strip().splitlines()[-1])


def install_sizes(client_python: Optional[str] = None) -> Dict:
    """Installed sizes of the dependency closures (this venv, this platform; the client venv's if given)."""
    out = {}
    if client_python:
        text = subprocess.run(
            [
                client_python,
                os.path.abspath(__file__),
                "_sizes",
                "flwr,torch,numpy,pillow",
                "torch,numpy,pillow",
                "flwr",
                "torch",
            ],
            capture_output=True,
            text=True,
            check=True,
            env=child_env(1),
        ).stdout
        sizes = json.loads(text.strip().splitlines()[-1])
        out["client_venv"] = {k: v["bytes"] for k, v in sizes.items()}
        out["client_python"] = client_python
        out["client_versions"] = client_versions(client_python)
    device = closure_size(["numpy", "pillow", "paho-mqtt", "cryptography", "onnxruntime"])
    out["device_onnx"] = device
    torch_cl = closure_size(["torch"])
    nvidia = sum(
        v
        for k, v in torch_cl["packages"].items()
        if k.startswith("nvidia") or k in ("triton", "cuda-bindings", "cuda-pathfinder")
    )
    out["torch"] = {"bytes": torch_cl["bytes"], "cuda_libs_bytes": nvidia, "cpu_only_bytes": torch_cl["bytes"] - nvidia}
    fl = closure_size(["flwr"])
    out["flwr"] = fl
    both = closure_size(["flwr", "torch", "numpy", "pillow"])
    nv = sum(
        v
        for k, v in both["packages"].items()
        if k.startswith("nvidia") or k in ("triton", "cuda-bindings", "cuda-pathfinder")
    )
    out["fedavg_client"] = {
        "bytes": both["bytes"],
        "cpu_only_bytes": both["bytes"] - nv,
        "packages": len([v for v in both["packages"].values() if v > 0]),
    }
    local = closure_size(["torch", "numpy", "pillow"])
    nv = sum(
        v
        for k, v in local["packages"].items()
        if k.startswith("nvidia") or k in ("triton", "cuda-bindings", "cuda-pathfinder")
    )
    out["local_only"] = {"bytes": local["bytes"], "cpu_only_bytes": local["bytes"] - nv}
    for k in ("device_onnx", "flwr"):
        out[k] = {"bytes": out[k]["bytes"], "packages": len([v for v in out[k]["packages"].values() if v > 0])}
    return out


# ---------------------------------------------------------------- report


def per_device_table(result: Dict) -> List[Dict]:
    """One row per method and device, mean over seeds."""
    rows = []
    seeds = list(result["seeds"].values())
    inst = result.get("install", {})
    for method in ("ecos", "fedavg", "fedavg-dp", "local-only", "upload"):
        with_method = [s for s in seeds if method in s]  # a method may have run for fewer seeds (fedavg-dp)
        if not with_method:
            continue
        for d in result["domains"]:
            vals = [s[method]["devices"][d] for s in with_method]

            def m(key, vals=vals):
                xs = [v[key] for v in vals if v.get(key) is not None]
                return float(np.mean(xs)) if xs else None

            acc = [v["accuracy"] if "accuracy" in v else None for v in vals]
            if method == "ecos":
                row = dict(
                    up=m("scores_bytes"),
                    down=m("probe_bytes") + m("model_download_bytes"),
                    cpu=m("score_cpu_s"),
                    macs=m("device_macs"),
                    rss=m("score_peak_rss_mb"),
                    rounds=1,
                    wall=m("score_wall_s"),
                    privacy=f"ε={m('epsilon_spent'):.2f}",
                    install=inst.get("device_onnx", {}).get("bytes"),
                )
            elif method in ("fedavg", "fedavg-dp"):
                fed = [s[method] for s in with_method]
                acc = [best_accuracy(f, d) for f in fed]
                priv = (
                    "none (raw updates)" if method == "fedavg" else f"ε={fed[0]['dp']['epsilon_total']:.2f} (local DP)"
                )
                row = dict(
                    up=m("wire_bytes_up"),
                    down=m("wire_bytes_down"),
                    cpu=m("process_cpu_s"),
                    macs=m("device_macs"),
                    rss=m("process_peak_rss_mb"),
                    rounds=float(np.mean([f["rounds_run"] for f in fed])),
                    wall=float(np.mean([f["wall_s"] for f in fed])),
                    privacy=priv,
                    install=_install(inst, "fedavg"),
                    cpu_work=m("fit_cpu_s") + m("eval_cpu_s"),
                    param_up=m("param_bytes_up"),
                    param_down=m("param_bytes_down"),
                )
            elif method == "local-only":
                row = dict(
                    up=0,
                    down=0,
                    cpu=m("process_cpu_s"),
                    macs=m("device_macs"),
                    rss=m("peak_rss_mb"),
                    rounds=0,
                    wall=m("wall_s"),
                    privacy="nothing leaves",
                    install=_install(inst, "local"),
                    cpu_work=m("train_cpu_s"),
                )
            else:
                dl = result.get("student_bytes", {}).get("int8_bytes")
                row = dict(
                    up=m("upload_bytes"),
                    down=dl,
                    cpu=None,
                    macs=0,
                    rss=None,
                    rounds=1,
                    wall=None,
                    privacy="raw images (ε=∞)",
                    install=None,
                )
            row.update(
                seeds=len(with_method),
                method=method,
                domain=d,
                accuracy=float(np.mean(acc)),
                accs=[float(a) for a in acc],
                accuracy_std=float(np.std(acc)) if len(acc) > 1 else None,
            )
            rows.append(row)
    return rows


def _install(inst: Dict, what: str) -> Optional[int]:
    """The device install of a method that trains on the device: the CPU-only client venv's closure if measured."""
    venv = inst.get("client_venv")
    if venv:
        return venv["flwr,torch,numpy,pillow" if what == "fedavg" else "torch,numpy,pillow"]
    return inst.get("fedavg_client" if what == "fedavg" else "local_only", {}).get("cpu_only_bytes")


def best_accuracy(fed: Dict, domain: str) -> float:
    """A device's accuracy with the global model of the round of best mean accuracy (the model FedAvg would ship)."""
    best = max(fed["server"]["rounds"], key=lambda r: r["mean"])
    return best["accuracy"][domain]


def _b(x) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    if x >= 1e6:
        return f"{x / 1e6:.2f} MB"
    if x >= 1e3:
        return f"{x / 1e3:.1f} kB"
    return f"{x:.0f} B"


def _n(x, fmt: str, unit: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{unit}"


def _command(command: str) -> str:
    parts = command.split(" + ")
    if len(parts) == 1:
        return f"Command: `python benchmarks/vs_fedavg.py {command}`."
    return (
        f"Run as {len(parts)} parallel parts merged with `--merge` (differing in `--seeds`, `--methods`, `--domains`, "
        f"`--patience`, `--dp`; every command is in the JSON's `command`), the first: "
        f"`python benchmarks/vs_fedavg.py {parts[0]}`."
    )


def _versions(inst: Dict) -> str:
    v = inst.get("client_versions")
    return f"torch {v['torch']}, flwr {v['flwr']}" if v else f"`{inst['client_python']}`"


def _cpu(r: Dict) -> str:
    """Process CPU seconds, and in brackets those of the work itself (training, evaluation) where measured."""
    if r.get("cpu_work") is None:
        return _n(r["cpu"], ".1f")
    return f"{r['cpu']:.1f} ({r['cpu_work']:.1f})"


def _macs(x) -> str:
    if x is None:
        return "–"
    return "0" if x == 0 else f"{x / 1e9:.2f} G"


def markdown(result: Dict) -> str:
    rows = per_device_table(result)
    cfg = result["config"]
    inst = result.get("install", {})
    seeds = list(result["seeds"])
    lines = [
        f"## The {cfg['source']} benchmark",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs shared with other jobs "
        f"(load average {result['machine'].get('load', '?')} at the start: wall times are inflated, CPU seconds "
        f"much less). {_command(result['command'])} "
        f"{'Longest part' if ' + ' in result['command'] else 'Total'} wall time {result['seconds'] / 60:.0f} min. "
        f"Seeds: {', '.join(seeds)}.",
        "",
        f"Devices = the {len(result['domains'])} device domains ({', '.join(result['domains'])}), each with its "
        f"own local labelled images ({cfg.get('local_images', '?')}) and test images. Student: the benchmarks' small "
        f"CNN ({result['student_values']} values, {result['student_forward_macs'] / 1e6:.2f} M MACs per 32x32 "
        "image) for every method. ECOS: probe of K="
        f"{cfg['k']} centroids, a real `ecos-device score` process at ε={cfg['epsilon']}, B={cfg['budget']} pool "
        f"images selected, student trained {cfg['epochs']} epochs in the cloud. FedAvg: Flower "
        f"{result.get('flwr_version', '')} `start_server` + one `start_client` process per device on loopback, "
        f"{cfg['local_epochs']} local epoch(s) per round, stop after {cfg['patience']} rounds without a gain of "
        f"{cfg['min_delta']} in mean test accuracy; its accuracy is the global model of the best round (chosen on "
        "the test images: favours FedAvg). Local-only and upload: the same student, "
        f"{cfg['epochs']} epochs, on the device's own images / on all devices' images pooled.",
        "",
        "Accuracy ± is the standard deviation over seeds (per device; in the mean table, of the mean over devices). "
        "Bytes: ECOS up = the scores message, down = the probe "
        "plus the int8 ONNX student (delivery's chunking adds a few percent, docs/results/ota.md); FedAvg = "
        "bytes on the wire; upload up = the device's image files. Device CPU s = the device process's user + "
        "system seconds, with interpreter and import start-up (in brackets: training and evaluation alone); "
        "ECOS's is the `ecos-device score` process. MACs: ECOS = one encoder pass per local image; training = "
        "3 forward passes per sample and epoch; running the delivered model afterwards is the same for every "
        "method and not counted. Wall s: ECOS = the score process; FedAvg = the whole federation (all devices "
        "at once); local-only = the training process.",
        "",
        "| method | device | accuracy | bytes up | bytes down | device CPU s | device MACs | peak RSS | rounds | "
        "wall s | privacy | install |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['accuracy']:.3f}" + (f" ± {r['accuracy_std']:.3f}" if r["accuracy_std"] is not None else "")
        lines.append(
            f"| {r['method']} | {r['domain']} | {acc} | {_b(r['up'])} | {_b(r['down'])} | "
            f"{_cpu(r)} | {_macs(r['macs'])} | {_n(r['rss'], '.0f', ' MB')} | {r['rounds']:.0f} | "
            f"{_n(r['wall'], '.0f')} | {r['privacy']} | {_b(r['install'])} |"
        )
    lines += [
        "",
        "Mean over devices:",
        "",
        "| method | accuracy | bytes up | bytes down | device CPU s | device MACs | peak RSS | rounds | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]

        def mean(k, rs=rs):
            xs = [r[k] for r in rs if r[k] is not None]
            return float(np.mean(xs)) if xs else None

        per_seed = np.mean(np.array([r["accs"] for r in rs]), axis=0)  # device mean per seed
        spread = f" ± {np.std(per_seed):.3f}" if len(per_seed) > 1 else ""
        lines.append(
            f"| {method} | {mean('accuracy'):.3f}{spread} | {_b(mean('up'))} | {_b(mean('down'))} | "
            f"{_n(mean('cpu'), '.1f')} | {_macs(mean('macs'))} | {_n(mean('rss'), '.0f', ' MB')} | "
            f"{mean('rounds'):.0f} | {rs[0]['seeds']} |"
        )
    fed = [r for r in rows if r["method"] == "fedavg"]
    if fed:
        lines += [
            "",
            f"FedAvg's serialized parameters (Flower's np.save tensors) per device: "
            f"{_b(np.mean([r['param_up'] for r in fed]))} up, {_b(np.mean([r['param_down'] for r in fed]))} "
            f"down (fit and evaluate messages); the bytes in the table are those on the wire (gRPC over "
            f"loopback, counted by a proxy per client). One model is {_b(result['student_flower_bytes'])} "
            "serialized.",
        ]
    if inst:
        text = (
            "Install size: the installed files of each dependency closure (Linux x86_64). Device-only ECOS "
            f"(`numpy, pillow, paho-mqtt, cryptography, onnxruntime`, this venv): {_b(inst['device_onnx']['bytes'])}. "
        )
        if inst.get("client_venv"):
            v = inst["client_venv"]
            text += (
                f"The FedAvg client and local-only processes ran in a venv with a CPU-only torch "
                f"({_versions(inst)}): `flwr, torch, numpy, pillow` {_b(v['flwr,torch,numpy,pillow'])} "
                f"(FedAvg), `torch, numpy, pillow` {_b(v['torch,numpy,pillow'])} (local-only), of which `flwr` "
                f"{_b(v['flwr'])} and `torch` {_b(v['torch'])} (made with `python3 -m venv V; V/bin/pip install "
                "torch-<version>+cpu-<...>.whl 'flwr==1.42.*' pillow`). "
            )
        cuda = inst["fedavg_client"]["bytes"]
        text += f"With this venv's CUDA build of torch the FedAvg client's closure is {_b(cuda)}. "
        for name, w in inst.get("wheels", {}).items():
            text += f"Wheel `{name}`: {_b(w['wheel_bytes'])} to download, {_b(w['unpacked_bytes'])} unpacked"
            cuda = w.get("cuda_requirements")
            text += (
                f"; on Linux it also requires {len(cuda)} CUDA packages ({', '.join(c.split(';')[0] for c in cuda)}), "
                "not counted; a CPU-only build would come from PyTorch's own index (not measured here). "
                if cuda
                else ". "
            )
        lines += ["", text.strip()]
    dp = [s["fedavg-dp"]["dp"] for s in result["seeds"].values() if "fedavg-dp" in s]
    if dp:
        d = dp[0]
        lines += [
            "",
            f"FedAvg with DP: Flower's LocalDpMod mechanism (clip the update to L2 norm {d['clip']}, add "
            f"Gaussian noise σ = {d['sigma']:.1f} per value) at ε = {d['epsilon_round']:.3f}, δ = 1e-5 per "
            f"round for {d['rounds']} fixed rounds: ε = {d['epsilon_total']} in total by basic composition. "
            f"The noise's L2 norm is about {d['sigma'] * math.sqrt(result['student_values']) / d['clip']:.0f} times "
            "the clipped update's (√6 less after averaging six devices): the model does not learn. Flower's central "
            "DP (noise added by the server) would hide the updates from other parties but not from the server, "
            "so it does not match ECOS's local guarantee.",
        ]
    return "\n".join(lines) + "\n"


TITLE = "# ECOS against FedAvg (Flower), local-only training and uploading the data"


def merge(paths: List[str]) -> Dict:
    """One result from parts run in parallel on the same benchmark (same data, encoder and seeds)."""
    parts = []
    for path in paths:
        with open(path) as fh:
            parts.append(json.load(fh))
    result = dict(parts[0])
    result["seeds"] = {}
    for part in parts:
        if part["config"]["source"] != result["config"]["source"]:
            raise SystemExit(f"{paths}: not parts of one benchmark (the sources differ)")
        for seed, methods in part["seeds"].items():
            for method, res in methods.items():
                mine = result["seeds"].setdefault(seed, {}).setdefault(method, json.loads(json.dumps(res)))
                mine["devices"].update(res["devices"])  # a method run for some devices in each part
        if "student_bytes" in part:
            result["student_bytes"] = part["student_bytes"]
        if part["config"].get("local_images"):
            result["config"]["local_images"] = part["config"]["local_images"]
        if "fedavg" in part["config"]["methods"]:  # the settings of the part that ran it
            result["config"].update(
                {k: part["config"][k] for k in ("patience", "max_rounds", "min_delta", "local_epochs")}
            )
        if part["config"]["dp"]:
            result["config"].update({k: part["config"][k] for k in ("dp_rounds", "clip")})
    result["domains"] = sorted({d for part in parts for d in part["domains"]})
    result["seconds"] = max(part["seconds"] for part in parts)
    result["command"] = " + ".join(part["command"] for part in parts)
    result["config"]["methods"] = sorted({m for part in parts for m in part["config"]["methods"]})
    result["config"]["dp"] = any(part["config"]["dp"] for part in parts)
    result["machine"]["load"] = max(part["machine"]["load"] for part in parts)
    return result


def report(results: List[Dict], docs: str) -> str:
    """docs/results/vs_fedavg.md (one section per benchmark) and vs_fedavg.png (one row per benchmark)."""
    text = "\n".join([TITLE, "", "![accuracy and device cost](vs_fedavg.png)", ""] + [markdown(r) for r in results])
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, "vs_fedavg.md"), "w") as fh:
        fh.write(text)
    plot(results, os.path.join(docs, "vs_fedavg.png"))
    return text


def plot(results: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(
        len(results), 4, figsize=(19, 4.4 * len(results)), squeeze=False, gridspec_kw={"width_ratios": [1.6, 1, 1, 1.2]}
    )
    for axes, result in zip(grid, results):
        _plot_row(axes, result)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_row(axes, result: Dict) -> None:
    rows = per_device_table(result)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    domains = result["domains"]
    source = result["config"]["source"]
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        accs = [next(r["accuracy"] for r in rows if r["method"] == m and r["domain"] == d) for d in domains]
        axes[0].bar(np.arange(len(domains)) + j * width, accs, width, label=m, color=colour[m])
    axes[0].set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, rotation=30, ha="right")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title(f"{source}: accuracy on each device's test images")
    axes[0].legend(fontsize=7, loc="lower left")
    for ax, key, title in ((axes[1], "bytes", "device bytes, up + down (log)"), (axes[2], "cpu", "device CPU s (log)")):
        for i, m in enumerate(methods):
            rs = [r for r in rows if r["method"] == m]
            if key == "bytes":
                v = float(np.mean([(r["up"] or 0) + (r["down"] or 0) for r in rs]))
                label = _b(v)
            else:
                xs = [r["cpu"] for r in rs if r["cpu"] is not None]
                v = float(np.mean(xs)) if xs else 0.0
                label = f"{v:.1f}" if xs else "not measured"
            if m == "local-only" and key == "bytes":
                label = "0"
            ax.bar(i, v if v > 0 else np.nan, color=colour[m])
            ax.annotate(label, (i, v if v > 0 else 1), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(title)
    ax = axes[3]
    for s in result["seeds"].values():
        if "fedavg" in s:
            rounds = s["fedavg"]["server"]["rounds"]
            ax.plot([r["round"] for r in rounds], [r["mean"] for r in rounds], color=colour["fedavg"], lw=1)
    for m in methods:
        if m not in ("fedavg", "fedavg-dp"):
            mean = float(np.mean([r["accuracy"] for r in rows if r["method"] == m]))
            ax.axhline(mean, color=colour[m], ls="--", lw=1, label=f"{m} {mean:.3f}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("FedAvg round")
    ax.set_title("mean accuracy: FedAvg per round (solid)")
    ax.legend(fontsize=7, loc="lower right")


# ---------------------------------------------------------------- CLI


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_sizes":
        print(json.dumps({r: closure_size(r.split(",")) for r in argv[1:]}))
        return 0
    if argv and argv[0] in ("_client", "_server", "_train"):
        p = argparse.ArgumentParser(prog=f"vs_fedavg {argv[0]}")
        p.add_argument("--data", required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", required=True)
        p.add_argument("--domain")
        p.add_argument("--server")
        p.add_argument("--port", type=int)
        p.add_argument("--clients", type=int)
        p.add_argument("--max-rounds", type=int)
        p.add_argument("--patience", type=int)
        p.add_argument("--min-delta", type=float)
        p.add_argument("--fixed-rounds", action="store_true")
        p.add_argument("--local-epochs", type=int, default=1)
        p.add_argument("--epochs", type=int, default=15)
        p.add_argument("--dp-epsilon-round", type=float, default=0.0)
        p.add_argument("--clip", type=float, default=1.0)
        a = p.parse_args(argv[1:])
        return {"_client": role_client, "_server": role_server, "_train": role_train}[argv[0]](a)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("generated", "real"), default="generated")
    p.add_argument("--workdir", help="work folder: data/ (made if absent) and encoder/ (trained if absent)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--domains", nargs="*", help="only these device domains (default all)")
    p.add_argument(
        "--methods",
        nargs="*",
        default=["ecos", "local-only", "upload", "fedavg"],
        choices=["ecos", "local-only", "upload", "fedavg"],
    )
    p.add_argument(
        "--dp", action="store_true", help="also FedAvg with Flower's local DP at a total epsilon of --epsilon"
    )
    p.add_argument("--dp-rounds", type=int, default=10, help="fixed rounds of the DP FedAvg (epsilon split evenly)")
    p.add_argument("--clip", type=float, default=1.0, help="L2 clipping norm of the DP FedAvg update")
    p.add_argument("--epsilon", type=float, default=0.58)
    p.add_argument("--budget", type=int, default=1000, help="pool images ECOS selects per device")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--encoder-epochs", type=int, default=5)
    p.add_argument(
        "--epochs", type=int, default=15, help="epochs of the centrally trained students (ecos, local, upload)"
    )
    p.add_argument("--local-epochs", type=int, default=1, help="FedAvg local epochs per round")
    p.add_argument("--max-rounds", type=int, default=60)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--min-delta", type=float, default=0.002)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600, help="seconds any one process may run")
    p.add_argument(
        "--client-python",
        help="python of the FedAvg client and local-only processes (default: this one), "
        "e.g. a venv with flwr and a CPU-only torch",
    )
    p.add_argument(
        "--wheels",
        nargs="*",
        help="wheel files whose download and unpacked sizes to report (e.g. torch's aarch64 wheel from pip download)",
    )
    p.add_argument("--out", help="JSON (default benchmarks/results/vs_fedavg_<source>.json)")
    p.add_argument("--docs", default="docs/results")
    p.add_argument(
        "--merge",
        metavar="JSON",
        nargs="+",
        help="merge result files of one benchmark run in parts "
        "(e.g. --methods split over processes) into --out, then report",
    )
    p.add_argument("--report", metavar="JSON", nargs="+", help="only write the table and plot from these result files")
    args = p.parse_args(argv)
    if args.merge:
        out = args.out or os.path.join("benchmarks", "results", f"vs_fedavg_{args.source}.json")
        with open(out, "w") as fh:
            json.dump(merge(args.merge), fh, indent=1, default=str)
        paths = args.report or [out]
    elif args.report:
        paths = args.report
    else:
        if not args.workdir:
            p.error("--workdir is needed to run")
        from cloud.log import setup_logging

        setup_logging()
        import flwr

        t0 = time.time()
        load = os.getloadavg()[0]
        result = run(args)
        install = install_sizes(args.client_python)
        install["wheels"] = {os.path.basename(w): wheel_sizes(w) for w in args.wheels or []}
        result.update(
            install=install,
            flwr_version=flwr.__version__,
            seconds=time.time() - t0,
            command=" ".join(argv),
            config={k: v for k, v in vars(args).items() if k not in ("data",)},
            machine={
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load": round(load, 1),
            },
        )
        result["config"]["local_images"] = (
            result["seeds"][str(args.seeds[0])]
            .get("ecos", {})
            .get("devices", {})
            .get(result["domains"][0], {})
            .get("local_images")
        )
        out = args.out or os.path.join("benchmarks", "results", f"vs_fedavg_{args.source}.json")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        # the report covers every benchmark run so far (their JSON files beside this one)
        folder = os.path.dirname(out) or "."
        others = [os.path.join(folder, f"vs_fedavg_{s}.json") for s in ("generated", "real") if s != args.source]
        paths = sorted([out] + [o for o in others if os.path.exists(o)], key=lambda q: "real" in os.path.basename(q))
    results = []
    for path in paths:
        with open(path) as fh:
            results.append(json.load(fh))
    print(report(results, args.docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
