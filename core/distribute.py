"""Training on several devices or hosts through the standard engine (``tf.distribute``).

``--strategy`` of ``python -m core.train`` names one of :data:`STRATEGIES`:

- ``default``: one device (TensorFlow's default strategy);
- ``mirrored``: every local device, variables mirrored (``tf.distribute.MirroredStrategy``);
- ``multiworker``: several processes, usually on several hosts, each with its local devices,
  kept in step by collective all-reduce (``tf.distribute.MultiWorkerMirroredStrategy``). Every
  worker runs the same command with its own ``TF_CONFIG`` environment variable::

      TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                  "task": {"type": "worker", "index": 0}}'

The rules a multi-worker run follows, all in this module:

- :func:`tf_config` parses and checks ``TF_CONFIG`` and names what is wrong with it.
- The chief (task ``chief``, or worker 0 when the cluster has no ``chief``) is the one worker
  that writes the run folder; the others write to a throwaway folder (:func:`runs_root`), since
  every worker must still take part in every step, including saving (which may need collective
  reads of the variables).
- Each worker reads the same in-memory dataset and keeps its own share of every global batch
  (:data:`SHARD_POLICY` ``DATA``: there are no files to split, and every worker then sees the same
  sequence of global batches as a single machine would).
- The strategy must exist before TensorFlow builds a model or a dataset in the process (the
  collectives are configured when it is created); ``core.train`` creates it right before the model.
- The workers stay in the cluster until the chief has evaluated and written the run
  (:func:`barrier`): a worker that leaves stops its heartbeats and the chief's peers report it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

STRATEGIES = ("default", "mirrored", "multiworker")
SHARD_POLICY = "DATA"


class ClusterError(ValueError):
    """``TF_CONFIG`` is missing or malformed for a multi-worker run; the message says how."""


def tf_config(raw: str | None = None) -> dict | None:
    """The parsed ``TF_CONFIG`` (``raw``, else the environment variable); ``None`` when unset.

    Returns ``{"cluster": {type: [host:port, ...]}, "type": str, "index": int, "workers": int,
    "chief": bool}`` (``workers`` counts the chief and the workers). Raises :class:`ClusterError`.
    """
    raw = os.environ.get("TF_CONFIG") if raw is None else raw
    if raw is None or not raw.strip():
        return None
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise ClusterError(f"TF_CONFIG is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict) or not isinstance(cfg.get("task"), dict):
        raise ClusterError('TF_CONFIG needs {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}')
    cluster = cfg["cluster"]
    for kind, hosts in cluster.items():
        if kind not in ("chief", "worker", "evaluator", "ps"):
            raise ClusterError(f"TF_CONFIG cluster has an unknown task type {kind!r}")
        if not isinstance(hosts, list) or not hosts or not all(_is_address(h) for h in hosts):
            raise ClusterError(f"TF_CONFIG cluster[{kind!r}] must be a non-empty list of 'host:port' strings; got {hosts!r}")
    if "ps" in cluster or "evaluator" in cluster:
        raise ClusterError("TF_CONFIG for --strategy multiworker has only 'chief' and 'worker' tasks (no 'ps', 'evaluator')")
    if "worker" not in cluster and "chief" not in cluster:
        raise ClusterError("TF_CONFIG cluster lists no 'worker'")
    if len(cluster.get("chief", [])) > 1:
        raise ClusterError("TF_CONFIG cluster has more than one 'chief'")
    kind, index = cfg["task"].get("type"), cfg["task"].get("index")
    if kind not in cluster:
        raise ClusterError(f"TF_CONFIG task type {kind!r} is not in the cluster ({sorted(cluster)})")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise ClusterError(f"TF_CONFIG task index {index!r} is out of range for {len(cluster[kind])} {kind!r} task(s)")
    addresses = [h for hosts in cluster.values() for h in hosts]
    if len(set(addresses)) != len(addresses):
        raise ClusterError("TF_CONFIG cluster lists one host:port twice")
    chief = kind == "chief" or ("chief" not in cluster and kind == "worker" and index == 0)
    return {"cluster": cluster, "type": kind, "index": index, "workers": len(addresses), "chief": chief}


def _is_address(h) -> bool:
    if not isinstance(h, str) or ":" not in h:
        return False
    host, port = h.rsplit(":", 1)
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def is_chief(name: str | None = None) -> bool:
    """True when this process writes the run: always, except on the non-chief workers of a
    ``multiworker`` run."""
    if name != "multiworker":
        return True
    cfg = tf_config()
    return cfg is None or cfg["chief"]


def check(name: str | None, resume: bool = False) -> None:
    """Refuse an unknown strategy name, ``multiworker`` without a usable ``TF_CONFIG``, or a
    multi-worker ``--resume`` (the workers' checkpoints are not kept)."""
    if name == "multiworker" and resume:
        raise ValueError("--resume is not supported with --strategy multiworker; start a new run")
    if name in (None, "", *STRATEGIES):
        if name == "multiworker" and tf_config() is None:
            raise ClusterError(
                "--strategy multiworker needs the TF_CONFIG environment variable on every worker, e.g. "
                'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}\''
            )
        return
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def strategy(name: str | None):
    """The ``tf.distribute`` strategy named ``name`` (see the module docstring)."""
    check(name)
    import tensorflow as tf  # lazy: tensorflow costs ~3.5 s; core.train imports this module and is TF-free until it fits

    if not name or name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    return _multi_worker_strategy()


def _multi_worker_strategy():
    """``tf.distribute.MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras 3 gives it.

    Keras 3's ``Model.fit`` on several workers calls ``strategy.reduce`` (1) on the first batch,
    a nested structure, to build the model, and (2) with ``axis=0`` on each step's scalar logs.
    The collective strategy reduces single values only and refuses an axis on a scalar, so
    ``fit`` fails with more than one worker (keras-team/keras#20585, tensorflow/tensorflow#72388).
    This ``reduce`` maps over the structure, as the one-host ``MirroredStrategy`` does, and
    reduces a scalar across the replicas only: the same results, through the public API.
    """
    import tensorflow as tf  # lazy: see strategy

    class MultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def one(v):
                rank = self.experimental_local_results(v)[0].shape.rank
                return super(MultiWorker, self).reduce(reduce_op, v, None if rank == 0 else axis)

            return tf.nest.map_structure(one, value)

    return MultiWorker()


def average_variables(variables, strategy) -> None:
    """Set each variable, on every replica, to its mean over the replicas (all workers take part).

    Keras 3 keeps batch-normalisation moving statistics per replica: each worker tracks those of
    its own share of the data, so without this the workers (and the chief's saved model) end an
    epoch with different non-trainable weights while the trainable ones agree.
    """
    variables = list(variables)
    if strategy.num_replicas_in_sync == 1 or not variables:
        return
    import tensorflow as tf  # lazy: see strategy

    local = tf.function(lambda: strategy.run(lambda: [tf.identity(v.value) for v in variables]))()
    for v, mean in zip(variables, strategy.reduce("MEAN", local, axis=None), strict=True):
        v.assign(mean)


def callbacks(strategy, model) -> list:
    """Keras callbacks a distributed ``fit`` of ``model`` needs, placed before the run's own
    (which save the model): the non-trainable weights averaged over the replicas at the end of
    every epoch, so that every worker ends it with the same weights. [] on one replica."""
    if strategy.num_replicas_in_sync == 1:
        return []
    import keras  # lazy: as tensorflow in strategy

    return [keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: average_variables(model.non_trainable_variables, strategy))]


def barrier(strategy) -> None:
    """Wait until every worker of a multi-worker run gets here (no-op otherwise).

    The non-chief workers wait here while the chief evaluates and writes the run: a worker that
    exits stops sending heartbeats, and the cluster would report the chief's peer as crashed.
    """
    import tensorflow as tf  # lazy: see strategy

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.num_replicas_in_sync > 1:
        strategy.reduce("SUM", tf.function(lambda: strategy.run(lambda: tf.constant(1.0)))(), axis=None)


def shard(dataset):
    """``dataset`` with the sharding policy of :data:`SHARD_POLICY` (a no-op on one worker)."""
    import tensorflow as tf  # lazy: see strategy

    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = getattr(tf.data.experimental.AutoShardPolicy, SHARD_POLICY)
    return dataset.with_options(opts)


def runs_root(root, name: str | None = None) -> Path:
    """Where this process writes its run folder: ``root`` on the chief, a fresh temporary folder
    on the other workers of a multi-worker run (removed by :func:`discard`)."""
    if is_chief(name):
        return Path(root)
    cfg = tf_config()
    return Path(tempfile.mkdtemp(prefix=f"cxr-{cfg['type']}{cfg['index']}-"))


def discard(run, name: str | None = None) -> None:
    """Remove a non-chief worker's throwaway run folder (nothing on the chief)."""
    if not is_chief(name):
        shutil.rmtree(Path(run).parent, ignore_errors=True)
