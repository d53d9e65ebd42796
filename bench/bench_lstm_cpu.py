"""CPU timing (wall and process CPU time) of one ELMo LSTM layer-direction: elmo_fast's lstm_projection vs torch.nn.LSTM(proj_size)
vs reference.lstm_projection (AllenNLP's per-step algorithm), and the GEMM floor (the same GEMMs through
torch.mm alone). Median of repeats. Usage: python bench/bench_lstm_cpu.py [--threads 1 2] [--B 16 --T 22]
"""
import argparse
import json
import platform
import statistics
import time

import torch

from elmo_fast import functional as F
from elmo_fast import reference as R


def median_ms(fn, repeats):
    """Median wall ms and median process CPU ms (user + sys over all threads): on a shared, loaded
    machine the CPU time is the steadier figure at 1 thread."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return dict(wall=round(statistics.median(wall), 1), cpu=round(statistics.median(cpu), 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=22)
    ap.add_argument("--I", type=int, default=512)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--P", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    B, T, I, n, P = args.B, args.T, args.I, args.n, args.P
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(I, n, proj_size=P, batch_first=True)
    w_ih, w_hh = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    w_proj = lstm.weight_hr_l0.detach()
    x = torch.randn(B, T, I)
    lengths = torch.full((B,), T, dtype=torch.int64)
    h0, c0 = torch.zeros(B, P), torch.zeros(B, n)
    clips = (3.0, 3.0)
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        row = dict(threads=threads)
        with torch.no_grad():
            row["ours_fwd"] = median_ms(lambda: F.lstm_projection(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, *clips),
                                        args.repeats)
            row["torch_fwd"] = median_ms(lambda: lstm(x), args.repeats)
            row["ref_fwd"] = median_ms(lambda: R.lstm_projection(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, *clips),
                                       args.repeats)
            xf = x.reshape(B * T, I)
            hs, ms = torch.randn(B, P), torch.randn(B, n)

            def gemms():
                torch.mm(xf, w_ih.t())
                for _ in range(T):
                    torch.mm(hs, w_hh.t())
                    torch.mm(ms, w_proj.t())
            row["gemm_floor_fwd"] = median_ms(gemms, args.repeats)

        params = [p.detach().clone().requires_grad_() for p in (w_ih, w_hh, bias, w_proj)]
        xg = x.clone().requires_grad_()

        def ours_fb():
            out, h, c = F.lstm_projection(xg, lengths, params[0], params[1], params[2], params[3], h0, c0, *clips)
            out.sum().backward()

        def torch_fb():
            lstm.zero_grad()
            out, _ = lstm(xg)
            out.sum().backward()

        def ref_fb():
            out, h, c = R.lstm_projection(xg, lengths, params[0], params[1], params[2], params[3], h0, c0, *clips)
            out.sum().backward()
        row["ours_fwd_bwd"] = median_ms(ours_fb, args.repeats)
        row["torch_fwd_bwd"] = median_ms(torch_fb, args.repeats)
        row["ref_fwd_bwd"] = median_ms(ref_fb, args.repeats)
        results.append(row)
        print(json.dumps(row))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(json.dumps(dict(shape=dict(B=B, T=T, I=I, n=n, P=P), torch=torch.__version__, cpu=cpu,
                          python=platform.python_version())))


if __name__ == "__main__":
    main()
