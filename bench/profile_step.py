"""Where a training step's time goes: plain torch.nn against gradtool's torch backend.

Run it from the repository root::

    PYTHONPATH=. python bench/profile_step.py                    # the 8×8 digits cnn, CPU
    PYTHONPATH=. python bench/profile_step.py --device cuda --model vu-mnist-cnn --image 28 \\
        --batch 128

For each variant (the same weights, batch and optimiser, torch.optim.Adam): the host time of a
step (forward, loss, backward, Adam step) as issued, without waiting for the device, and the
time to ``torch.cuda.synchronize()`` (the same on a CPU); the number of kernels launched and the
device's kernel time per step; and ``torch.profiler``'s table of the operators by host time
(``--rows``). On a GPU a step whose host time exceeds its kernel time is bound by issuing the
kernels, not by computing them. Prints only; no goal.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", help="cnn, a shipped model name or a .toml file")
    ap.add_argument("--image", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--rows", type=int, default=15, help="profiler table rows (0: none)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from bench_cnn import copy_weights, plain_model
    from torch.profiler import ProfilerActivity, profile

    from gradtool.nn import build, cnn, load_model_file

    torch.set_num_threads(1)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    shape = (args.channels, args.image, args.image)
    desc = cnn(shape, 10) if args.model == "cnn" else load_model_file(args.model)
    ours, loss_fn = build(desc, "torch", seed=0)
    plain = plain_model(desc)
    copy_weights(ours, plain)
    ours, loss_fn, plain = ours.to(device), loss_fn.to(device), plain.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((args.batch, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for name, model, crit in (("plain", plain, F.cross_entropy), ("gradtool", ours, loss_fn)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, crit=crit, opt=opt):
            loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(10):
            step()
        sync()
        issued, done = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            sync()
            issued.append(t1 - t0)
            done.append(time.perf_counter() - t0)
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            sync()
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel")) / 5
        kernel_ms = sum(e.self_device_time_total for e in events) / 5 / 1e3
        print(f"== {args.model} {args.batch}×{'×'.join(map(str, shape))} on {device}, {name}: "
              f"host {statistics.median(issued) * 1e3:.3f} ms a step, "
              f"to sync {statistics.median(done) * 1e3:.3f} ms"
              + (f", {launches:.0f} kernel launches, {kernel_ms:.3f} ms of kernels" if gpu
                 else ""))
        if args.rows:
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                               max_name_column_width=45))


if __name__ == "__main__":
    main()
