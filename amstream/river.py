"""River estimators trained by online alternating minimization (AM-Adam, AM-mem).

``AMClassifier`` and ``AMRegressor`` *are* River estimators (``MiniBatchClassifier`` /
``MiniBatchRegressor``): they take dicts of features, work in pipelines and with
``evaluate.progressive_val_score``, and pass ``river.checks``. Underneath, one
:class:`amstream.learner.AMLearner` takes one AM update per internal minibatch.

How a sample travels::

    learn_one(x, y)
    ├── new feature names get the next columns (sorted within a sample), the input layer grows
    ├── a new label gets the next output, the output layer grows (classifier)
    ├── the row is written into a preallocated minibatch buffer (missing features are 0)
    └── buffer full (see ``batch_size`` and ``warmup``) -> one AM update on it, buffer cleared

    predict_one(x) / predict_proba_one(x)
    └── the learner's forward pass on a float64 NumPy row (unknown features are ignored)

``learn_many`` writes its rows into the same buffer and updates at the same points, so it
leaves the model exactly as the equivalent ``learn_one`` loop does.

River is imported here and nowhere else in amstream: ``import amstream`` does not import it.
"""
from __future__ import annotations

import io
import math
import random
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from river import base

from amstream.config import AMConfig
from amstream.exceptions import CheckpointError, ConfigError
from amstream.learner import Learner, learner_from_state, make_learner

__all__ = ["AMClassifier", "AMRegressor"]

STATE_VERSION = 1

# AMConfig fields that the estimators set themselves: not allowed in ``config``
_OWN_FIELDS = ("arch", "activation", "algo", "loss", "lr", "lr_out", "mu", "mem_decay", "mem_ridge", "seed")


def _values(x: dict, dtype) -> np.ndarray:
    """The values of x as an array (None is missing: NaN); TypeError for non-numbers."""
    try:
        return np.fromiter(x.values(), dtype, len(x))
    except (TypeError, ValueError):
        pass
    try:
        return np.array([np.nan if v is None else v for v in x.values()], dtype=dtype)
    except (TypeError, ValueError):
        bad = {k: v for k, v in x.items() if not isinstance(v, (int, float, np.number, type(None)))}
        raise TypeError("features must be numbers (encode categories first, e.g. with "
                        f"`preprocessing.OneHotEncoder`); got {bad}") from None


def _sorted_keys(keys: list) -> list:
    """Feature names in a fixed order whatever order a dict lists them in."""
    try:
        return sorted(keys)
    except TypeError:  # names of mixed types
        return sorted(keys, key=lambda k: (type(k).__name__, repr(k)))


# The estimators' parameters and attributes, documented once for both docstrings.
_PARAMETERS = """    Parameters
    ----------
    hidden_sizes
        Widths of the hidden layers.
    activation
        Activation of the hidden layers: relu, leaky_relu, tanh, sigmoid, identity or sign.
    algo
        ``"am-adam"`` or ``"am-mem"``.
    batch_size
        Samples per AM update once the warm-up is over (1 = an update on every sample).
    warmup
        Updates taken at each batch size 1, 2, 4, ... on the way up to ``batch_size``, so
        that the model learns from its first samples quickly (0 = no warm-up).
    lr
        Adam step of each hidden layer's local problem (AM-Adam; unused by AM-mem).
    lr_out
        Adam step of the output layer; ``None`` uses ``lr``.
    mu
        Weight of the quadratic penalty that ties codes to layer outputs (eq. (3)).
    mem_decay
        AM-mem only: forgetting factor gamma of the co-activation memories,
        ``A <- gamma * A + sum a a^T`` at each update (1.0 keeps plain sums, as in the paper;
        below 1 lets the hidden layers follow a drifting stream).
    mem_ridge
        AM-mem only: ridge added to the diagonal of the memory ``A`` when each hidden layer
        is re-solved, relative to the mean of that diagonal. It keeps the solve stable when
        the memory spans few samples (small batches, strong forgetting) or when inputs are
        rarely active (one-hot columns); the engine's own default, 1e-4, suits plain sums
        over large batches.
    seed
        Seeds the weight initialisation; ``None`` draws one at the first update.
    config
        Further :class:`amstream.AMConfig` fields as a dict, e.g. ``{"code_iters": 2}``
        or ``{"lr_decay_every": 1000}``."""


_ATTRIBUTES = """
    feature_names
        The feature names seen so far, in input-column order.
    n_updates
        AM updates taken so far.
    learner
        The underlying :class:`amstream.learner.AMLearner` (``None`` before the first update).
"""


def _document(cls):
    """Put the shared parameter and attribute documentation into ``cls``'s docstring."""
    cls.__doc__ = (cls.__doc__.replace("{parameters}\n", _PARAMETERS.strip("\n") + "\n\n")
                   .replace("{attributes}\n", _ATTRIBUTES.lstrip("\n")))
    return cls


class _AMEstimator(base.Estimator):
    """What the AM classifier and regressor share: features, buffer, learner, predictions."""

    _loss = "ce"

    def __init__(
        self,
        hidden_sizes: tuple[int, ...] = (64,),
        activation: str = "relu",
        algo: str = "am-adam",
        batch_size: int = 1,
        warmup: int = 16,
        lr: float = 0.003,
        lr_out: float | None = None,
        mu: float = 1.0,
        mem_decay: float = 0.8,
        mem_ridge: float = 0.3,
        seed: int | None = None,
        config: dict | None = None,
    ):
        self.hidden_sizes = hidden_sizes
        self.activation = activation
        self.algo = algo
        self.batch_size = batch_size
        self.warmup = warmup
        self.lr = lr
        self.lr_out = lr_out
        self.mu = mu
        self.mem_decay = mem_decay
        self.mem_ridge = mem_ridge
        self.seed = seed
        self.config = config
        self._check_params()
        self._reset_targets()

        # learned state, built as data arrives
        self._features: dict[Hashable, int] = {}  # feature name -> input column
        self._learner: Learner | None = None
        self._xbuf = np.zeros((batch_size, 1), dtype=np.float32)
        self._ybuf = self._new_ybuf()
        self._n_buf = 0
        self._n_updates = 0
        self._batch = self._current_batch()  # size of the minibatch being filled
        # derived from the features: the last key order learn_one saw, and where its values go
        self._keys: list = []
        self._cols: Any = slice(0, 0)

    @classmethod
    def _unit_test_params(cls):
        yield {"seed": 0}  # the defaults: an update on every sample
        yield {"batch_size": 32, "warmup": 1, "seed": 0}  # minibatches, warm-up
        yield {"algo": "am-mem", "hidden_sizes": (8,), "batch_size": 32, "warmup": 0, "seed": 1}
        yield {"hidden_sizes": (8, 6), "activation": "tanh", "batch_size": 32, "warmup": 0,
               "lr_out": 0.01}  # seed None: River's seeding check runs

    # -- parameters -------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.algo not in ("am-adam", "am-mem"):
            raise ConfigError(f"`algo` must be `am-adam` or `am-mem`, got `{self.algo!r}`")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"`batch_size` must be an integer >= 1, got `{self.batch_size!r}`")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"`warmup` must be an integer >= 0, got `{self.warmup!r}`")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"`seed` must be an integer or None, got `{self.seed!r}`")
        extra = dict(self.config or {})
        clash = sorted(set(extra) & set(_OWN_FIELDS))
        if clash:
            raise ConfigError(f"`config` may not set {', '.join(f'`{k}`' for k in clash)}: "
                              "they are parameters of the estimator")
        self._am_config(1, 2, 0)  # validates every field now rather than at the first update

    def _am_config(self, n_inputs: int, n_outputs: int, seed: int) -> AMConfig:
        lr_out = self.lr if self.lr_out is None else self.lr_out
        hidden = (self.hidden_sizes,) if isinstance(self.hidden_sizes, int) else tuple(self.hidden_sizes)
        return AMConfig(arch=(n_inputs, *hidden, n_outputs), activation=self.activation,
                        algo=self.algo, loss=self._loss, lr=self.lr, lr_out=lr_out, mu=self.mu,
                        mem_decay=self.mem_decay, mem_ridge=self.mem_ridge, seed=seed,
                        **dict(self.config or {}))

    @property
    def n_updates(self) -> int:
        """AM updates taken so far."""
        return self._n_updates

    @property
    def feature_names(self) -> list:
        """Feature names in input-column order."""
        return list(self._features)

    @property
    def learner(self) -> Learner | None:
        """The underlying AM learner (``None`` until the first update)."""
        return self._learner

    def _current_batch(self) -> int:
        """The size of the next minibatch: 1, 2, 4, ... (``warmup`` updates each), then ``batch_size``."""
        if self.warmup:
            return min(self.batch_size, 1 << min(self._n_updates // self.warmup, 62))
        return self.batch_size

    # -- features -----------------------------------------------------------------------
    @property
    def _n_inputs(self) -> int:
        return max(1, len(self._features))

    def _add_features(self, names: list) -> None:
        for name in _sorted_keys(names):
            self._features[name] = len(self._features)
        self._grow_inputs()

    def _grow_inputs(self) -> None:
        width = self._n_inputs
        if width > self._xbuf.shape[1]:
            grown = np.zeros((self.batch_size, width), dtype=np.float32)
            grown[:, : self._xbuf.shape[1]] = self._xbuf
            self._xbuf = grown
        if self._learner is not None and width > self._learner.n_inputs:
            self._learner.expand(n_inputs=width)

    def _columns(self, keys: list) -> Any:
        """Input columns of ``keys`` (all known): a slice when they are in column order."""
        cols = [self._features[k] for k in keys]
        if cols == list(range(len(cols))):
            return slice(0, len(cols))
        return np.asarray(cols, dtype=np.intp)

    def _write_row(self, x: dict) -> None:
        """x -> the next buffer row, registering new features (learn_one's path)."""
        keys = list(x)
        if keys != self._keys:
            new = [k for k in keys if k not in self._features]
            if new:
                self._add_features(new)
            self._keys, self._cols = keys, self._columns(keys)
        self._xbuf[self._n_buf, self._cols] = _values(x, np.float32)

    def _row(self, x: dict) -> np.ndarray:
        """x -> one float64 input row for predictions; unknown features are ignored."""
        row = np.zeros((1, self._n_inputs))
        if list(x) == self._keys:
            row[0, self._cols] = _values(x, np.float64)
        else:
            features = self._features
            for k, v in x.items():
                j = features.get(k)
                if j is not None:
                    row[0, j] = np.nan if v is None else v
        if not np.isfinite(row).all():
            np.nan_to_num(row, copy=False)
        return row

    def _forward_one(self, x: dict) -> np.ndarray:
        """Outputs [C] for one sample, in float64. When x lists its features in the order
        learn_one last saw, its values are read in one call and placed by the cached columns."""
        row = None
        if list(x) == self._keys:
            try:
                values = np.fromiter(x.values(), np.float64, len(x))
            except (TypeError, ValueError):
                values = None
            if values is not None and math.isfinite(values.sum()):
                cols = self._cols
                if cols.__class__ is slice and cols.stop == self._n_inputs:
                    row = values.reshape(1, -1)
                else:
                    row = np.zeros((1, self._n_inputs))
                    row[0, cols] = values
        if row is None:  # missing or non-finite values, another key order
            row = self._row(x)
        return self._learner.forward(row)[0]

    def _matrix(self, X) -> np.ndarray:
        """DataFrame -> float64 inputs for predictions; unknown columns ignored, NaN is 0."""
        out = np.zeros((len(X), self._n_inputs))
        known = [c for c in X.columns if c in self._features]
        if known:
            out[:, [self._features[c] for c in known]] = X[known].to_numpy(dtype=np.float64)
            np.nan_to_num(out, copy=False)
        return out

    # -- learning -----------------------------------------------------------------------
    def _learn_row(self, x: dict, target) -> None:
        self._write_row(x)
        self._ybuf[self._n_buf] = target
        self._n_buf += 1
        if self._n_buf >= self._batch:
            self._update()

    def _learn_frame(self, X, targets: list) -> None:
        """Rows of a DataFrame through the same buffer and update points as learn_one."""
        cols = list(X.columns)
        values = X.to_numpy(dtype=np.float32)
        unknown = [j for j, c in enumerate(cols) if c not in self._features]
        start, n = 0, len(X)
        while start < n:
            stop = min(n, start + self._batch - self._n_buf)
            if unknown:  # register new features row by row, as learn_one would (NaN = absent)
                present = ~np.isnan(values[start:stop][:, unknown])
                for r in range(stop - start):
                    new = [cols[unknown[j]] for j in np.flatnonzero(present[r])
                           if cols[unknown[j]] not in self._features]
                    if new:
                        self._add_features(new)
                unknown = [j for j in unknown if cols[j] not in self._features]
            self._register_targets(targets[start:stop])
            rows = slice(self._n_buf, self._n_buf + stop - start)
            self._xbuf[rows, [self._features[c] for c in cols if c in self._features]] = \
                values[start:stop][:, [j for j, c in enumerate(cols) if c in self._features]]
            self._ybuf[rows] = self._encode_targets(targets[start:stop])
            self._n_buf += stop - start
            start = stop
            if self._n_buf >= self._batch:
                self._update()

    def _update(self) -> None:
        """One AM update on the buffered minibatch, then clear the buffer."""
        n = self._n_buf
        x = self._xbuf[:n]
        if not math.isfinite(x.sum()):
            np.nan_to_num(x, copy=False)  # missing (NaN) is 0
        if self._learner is None:
            seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**31)
            self._learner = make_learner(self._am_config(self._n_inputs, self._n_outputs(), seed))
        self._learner.learn(x, self._ybuf[:n])
        x.fill(0.0)
        self._n_buf = 0
        self._n_updates += 1
        self._batch = self._current_batch()

    # -- predictions --------------------------------------------------------------------
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """Network outputs in float64 with the current weights (x is float64 [n, d])."""
        return self._learner.forward(x)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything learned, as plain values and tensors (see :meth:`load_state_dict`).

        Feature names and labels are stored as they are: ``torch.load(weights_only=True)``
        reads the result back when they are plain Python values (str, int, float, bool).
        """
        return {
            "version": STATE_VERSION,
            "features": list(self._features),
            "targets": self._targets_state(),
            "learner": None if self._learner is None else self._learner.state_dict(),
            "buffer_x": torch.from_numpy(self._xbuf[: self._n_buf].copy()),
            "buffer_y": torch.from_numpy(self._ybuf[: self._n_buf].copy()),
            "n_updates": self._n_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output, taken from an estimator with the same parameters."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"estimator state version `{state.get('version')}` is not supported "
                                  f"(expected {STATE_VERSION})")
        if state["learner"] is not None:
            saved = AMConfig.from_dict(state["learner"]["config"])
            if saved != self._am_config(saved.arch[0], saved.arch[-1], saved.seed):
                raise CheckpointError("estimator state was learned with other parameters than "
                                      f"this estimator's: {saved}")
        fresh = self.clone()
        fresh._features = {name: j for j, name in enumerate(state["features"])}
        fresh._grow_inputs()
        fresh._load_targets_state(state["targets"])
        if state["learner"] is not None:
            fresh._learner = learner_from_state(state["learner"])
        bx, by = state["buffer_x"].numpy(), state["buffer_y"].numpy()
        fresh._xbuf[: len(bx), : bx.shape[1]] = bx
        fresh._ybuf[: len(by)] = by
        fresh._n_buf = len(bx)
        fresh._n_updates = int(state["n_updates"])
        fresh._batch = fresh._current_batch()
        self.__dict__.update(fresh.__dict__)

    # -- pickling (River's persistence, copy.deepcopy) ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The learner travels as its state_dict saved by torch.save, never as the object:
        # pickling its torch.Generator keys the state by a memory address, so two pickles of
        # one unchanged estimator would differ.
        state = self.__dict__.copy()
        if self._learner is not None:
            buffer = io.BytesIO()
            torch.save(self._learner.state_dict(), buffer)
            state["_learner"] = buffer.getvalue()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("_learner"), bytes):
            saved = torch.load(io.BytesIO(state["_learner"]), weights_only=True)
            state = {**state, "_learner": learner_from_state(saved)}
        self.__dict__.update(state)

    # -- subclass hooks -----------------------------------------------------------------
    def _reset_targets(self) -> None:
        pass

    def _new_ybuf(self) -> np.ndarray:
        raise NotImplementedError

    def _n_outputs(self) -> int:
        raise NotImplementedError

    def _register_targets(self, targets: list) -> None:
        pass

    def _encode_targets(self, targets: list) -> Any:
        return targets

    def _targets_state(self) -> list:
        return []

    def _load_targets_state(self, targets: list) -> None:
        pass


@_document
class AMClassifier(_AMEstimator, base.MiniBatchClassifier):
    """A multi-layer perceptron classifier trained by online alternating minimization.

    Each internal minibatch gets one AM update (Choromanska et al., ICML 2019, Algorithm 2.1):
    codes of the hidden layers are solved for first, then every layer fits its own local
    problem, so no gradient flows through the network. ``algo="am-adam"`` takes an Adam step
    on each layer's local least-squares loss; ``algo="am-mem"`` keeps co-activation memories
    and re-solves each hidden layer from them by block-coordinate descent.

    Features may appear, vanish or arrive in any order: each new feature name gets an input
    column (the input layer grows, with zero weights), a missing feature counts as 0, and a
    feature never learned from is ignored by the predictions. Labels of any hashable type
    may appear at any time: each new one gets an output (the output layer grows).

    By default every sample gets its own update (``batch_size=1``): on drifting,
    autocorrelated streams the next sample is best predicted by a model that has learned
    the last one. With ``batch_size > 1`` samples are buffered and learned from in
    minibatches, which costs less per sample: the batch size starts at 1 and doubles every
    ``warmup`` updates up to ``batch_size`` (``warmup=0`` uses ``batch_size`` from the
    start). Predictions always use the current weights. ``learn_many`` feeds the same
    buffer, so it is equivalent to calling ``learn_one`` on each row.

    The estimator holds an :class:`amstream.learner.AMLearner` and uses nothing else of the
    engine: on the CPU the learner runs its update on NumPy arrays, whose cost per call suits
    the small networks and single samples of a stream (``AMLearner``'s ``backend``).

    The defaults (64 hidden units, ``lr=0.003``, ``mu=1``; for AM-mem ``mem_decay=0.8``,
    ``mem_ridge=0.3``) were chosen by ``benchmarks/river_tune.py`` on synthetic and real
    streams that the River benchmark does not report on.

    Inputs should be numbers on comparable scales: put a ``preprocessing.StandardScaler``
    in front, and encode categories first (e.g. ``preprocessing.OneHotEncoder``).

{parameters}
    Attributes
    ----------
    classes
        The labels seen so far, in output order.
{attributes}

    Examples
    --------
    >>> from river import datasets, evaluate, metrics, preprocessing
    >>> from amstream.river import AMClassifier

    >>> model = preprocessing.StandardScaler() | AMClassifier(seed=42)
    >>> evaluate.progressive_val_score(datasets.Phishing(), model, metrics.Accuracy())
    Accuracy: 90.15%

    >>> model["AMClassifier"].n_updates  # one per sample by default
    1250

    Labels and features may be new at any time:

    >>> model = AMClassifier(batch_size=1, seed=0)
    >>> model.learn_one({"a": 1.0}, "cat")
    >>> model.learn_one({"a": -1.0, "b": 2.0}, "dog")
    >>> sorted(model.predict_proba_one({"a": 1.0, "c": 3.0}))
    ['cat', 'dog']
    >>> model.feature_names
    ['a', 'b']

    References
    ----------
    .. [1] Choromanska, A., Cowen, B., Kumaravel, S., Luss, R., Rigotti, M., Rish, I.,
       Kingsbury, B., DiAchille, P., Gurev, V., Tejwani, R. and Bouneffouf, D., 2019.
       Beyond Backprop: Online Alternating Minimization with Auxiliary Variables. ICML.
    """

    _loss = "ce"

    @property
    def _multiclass(self) -> bool:
        return True

    @property
    def classes(self) -> list:
        """The labels seen so far, in output order."""
        return list(self._classes)

    # -- targets ------------------------------------------------------------------------
    def _reset_targets(self) -> None:
        self._classes: list = []
        self._class_index: dict = {}

    def _new_ybuf(self) -> np.ndarray:
        return np.zeros(self.batch_size, dtype=np.int64)

    def _n_outputs(self) -> int:
        return max(1, len(self._classes))

    def _add_class(self, y) -> int:
        index = self._class_index[y] = len(self._classes)
        self._classes.append(y)
        if self._learner is not None and len(self._classes) > self._learner.n_outputs:
            self._learner.expand(n_outputs=len(self._classes))
        return index

    def _register_targets(self, targets: list) -> None:
        for y in targets:
            if y not in self._class_index:
                self._add_class(y)

    def _encode_targets(self, targets: list) -> list:
        return [self._class_index[y] for y in targets]

    def _targets_state(self) -> list:
        return list(self._classes)

    def _load_targets_state(self, targets: list) -> None:
        for y in targets:
            self._add_class(y)

    # -- River API ----------------------------------------------------------------------
    def learn_one(self, x: dict, y: base.typing.ClfTarget) -> None:
        index = self._class_index.get(y)
        if index is None:
            index = self._add_class(y)
        self._learn_row(x, index)

    def learn_many(self, X, y) -> None:
        self._learn_frame(X, list(y))

    def predict_one(self, x: dict, **kwargs):
        # River's default takes the argmax of predict_proba_one's dict; the argmax of the
        # logits is the same label for a tenth of the cost of a progressive-validation step
        if self._learner is None:
            return self._classes[0] if self._classes else None
        return self._classes[int(self._forward_one(x).argmax())]

    # predict_many: River's default (the most probable label of predict_proba_many)
    def predict_proba_one(self, x: dict, **kwargs) -> dict:
        if self._learner is None:
            n = len(self._classes)
            return {c: 1.0 / n for c in self._classes}
        z = self._forward_one(x)
        p = np.exp(z - z.max())
        p /= p.sum()  # float64, renormalised: sums to 1 within rounding
        return dict(zip(self._classes, p.tolist()))

    def predict_proba_many(self, X):
        import pandas as pd

        if self._learner is None:
            p = np.full((len(X), len(self._classes)), 1.0 / max(1, len(self._classes)))
        else:
            p = self._learner.predict_proba(self._matrix(X))
        return pd.DataFrame(p, index=X.index, columns=self._classes)


@_document
class AMRegressor(_AMEstimator, base.MiniBatchRegressor):
    """A multi-layer perceptron regressor trained by online alternating minimization.

    The same model and learning scheme as :class:`AMClassifier` (see there for features,
    buffering, ``warmup`` and the AM algorithms), with the squared loss
    ``0.5 * (f(x) - y)^2`` and a single linear output.

    The network learns targets best when they are of order 1: wrap it in a
    ``preprocessing.TargetStandardScaler``, and scale the features with a
    ``preprocessing.StandardScaler``.

{parameters}
    Attributes
    ----------
{attributes}

    Examples
    --------
    >>> from river import datasets, evaluate, metrics, preprocessing
    >>> from amstream.river import AMRegressor

    >>> model = preprocessing.StandardScaler() | preprocessing.TargetStandardScaler(
    ...     AMRegressor(seed=42))
    >>> evaluate.progressive_val_score(datasets.TrumpApproval(), model, metrics.MAE())
    MAE: 0.581843
    """

    _loss = "mse"

    def _new_ybuf(self) -> np.ndarray:
        return np.zeros((self.batch_size, 1), dtype=np.float32)

    def _n_outputs(self) -> int:
        return 1

    def _encode_targets(self, targets: list) -> np.ndarray:
        return np.asarray(targets, dtype=np.float32).reshape(-1, 1)

    def learn_one(self, x: dict, y: base.typing.RegTarget) -> None:
        self._learn_row(x, y)

    def learn_many(self, X, y) -> None:
        self._learn_frame(X, list(y))

    def predict_one(self, x: dict, **kwargs) -> float:
        if self._learner is None:
            return 0.0
        return float(self._forward_one(x)[0])

    def predict_many(self, X):
        import pandas as pd

        if self._learner is None:
            return pd.Series(np.zeros(len(X)), index=X.index)
        return pd.Series(self._forward(self._matrix(X))[:, 0], index=X.index)
