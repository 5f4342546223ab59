"""System metrics of the node a trial runs on: CPU and memory, and GPU utilisation and memory through NVML where
there is a GPU, sampled in the background by MLflow's own monitors and averaged between two reads.

A trial reports them with its training metrics every `pretrain.log_every` steps (`system/<node>/<metric>` at the
global step), so the driver stays MLflow's only writer and each node's numbers reach the run of the point it
trained. NVML sees every GPU of the node, not only the trial's.
"""

from __future__ import annotations

import socket
import threading


class NodeSampler:
    """Samples every `interval` seconds until `close()`; `read()` returns the averages since the last read."""

    def __init__(self, interval: float = 5.0):
        self.node = socket.gethostname().split(".")[0]
        self.monitors = _monitors()
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True, name="system-metrics")
        if self.monitors:
            self.thread.start()

    def _run(self, interval: float) -> None:
        while not self.stopped.wait(interval):
            with self.lock:
                for monitor in self.monitors:
                    monitor.collect_metrics()

    def read(self) -> dict[str, float]:
        out = {}
        with self.lock:
            for monitor in self.monitors:
                if not any(monitor.metrics.values()):  # a log interval shorter than the sampling one: sample it now
                    monitor.collect_metrics()
                out.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        return {k: float(v) for k, v in out.items()}

    def close(self) -> None:
        self.stopped.set()

    def __enter__(self) -> NodeSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _monitors() -> list:
    """MLflow's CPU monitor (psutil) and GPU monitor (NVML), each where it can run here."""
    found = []
    try:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        found.append(CPUMonitor())
    except (ImportError, RuntimeError):
        pass
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        found.append(GPUMonitor())
    except Exception:  # noqa: BLE001  (no nvidia-ml-py, or NVML's own error on a machine without a GPU)
        pass
    return found
