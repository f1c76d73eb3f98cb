"""Arguments and output helpers shared by the subcommands (argparse only at import)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Defaults tuned on MNIST 784-500-500-10 (see README "Hyperparameters"); any AMConfig
# field can also be set with --set KEY=VALUE.
MODEL_FLAGS = {
    "mu": float, "lr": float, "lr_out": float, "code_iters": int, "code_iters_top": int,
    "mem_sweeps": int, "mem_decay": float, "weight_iters": int,
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--algo", default="am-adam",
                   choices=("am-adam", "am-mem", "am-adam-off", "am-mem-off", "sgd", "adam", "ste"))
    g.add_argument("--arch", default=None,
                   help="layer sizes, e.g. 784-500-500-10; hidden sizes only (500-500) take the "
                        "input and output sizes from the dataset (default 100-100); or a network: "
                        "lenet5, rnn:15 (an Elman RNN over the features, one per step), or a spec "
                        "such as 1x28x28-c6k5p2-pool2-c16k5-pool2-120-84-10 (see README)")
    g.add_argument("--activation", default="relu",
                   help="one activation for all hidden layers or a comma list (e.g. sign,tanh)")
    g.add_argument("--no-bias", action="store_true", help="linear layers without bias")
    g.add_argument("--mu", type=float, default=None, help="quadratic penalty weight (default 1.0)")
    g.add_argument("--lr", type=float, default=None, help="hidden-layer (or backprop) learning rate")
    g.add_argument("--lr-out", type=float, default=None, help="output-layer step eta")
    g.add_argument("--lr-decay-epochs", type=float, default=0,
                   help="halve the learning rates every this many epochs (0: never)")
    g.add_argument("--code-iters", type=int, default=None, help="iterations per hidden code problem (5)")
    g.add_argument("--code-iters-top", type=int, default=None, help="iterations for the top code problem (4)")
    g.add_argument("--mem-sweeps", type=int, default=None, help="AM-mem: BCD sweeps per minibatch")
    g.add_argument("--mem-decay", type=float, default=None, help="AM-mem: forgetting factor (1 = none)")
    g.add_argument("--weight-iters", type=int, default=None, help="weight steps per minibatch")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any AMConfig field (repeatable), e.g. --set mem_block=32")
    g.add_argument("--config", default=None, help="TOML file with AMConfig fields (flags override it)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: fastest for these sizes on shared cores)")
    g.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def setup_runtime(args: argparse.Namespace):
    import torch

    from amstream.exceptions import ConfigError

    torch.set_num_threads(max(1, int(args.threads)))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("`--device cuda` was given but torch sees no CUDA device")
    return torch.device(args.device)


def parse_key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=x", "c=true"]`` -> ``{"a": 1, "b": "x", "c": True}``: the one parser of
    repeatable KEY=VALUE flags (``--set``, ``--consumer-config``, ``--producer-config``).

    A value is read as JSON (numbers, ``true``/``false``/``null``, lists, quoted strings), else
    ``True``/``False`` in any case, else taken as the string it is.

    >>> parse_key_values(["lr=3e-3", "arch=784-100-10", "bias=False", "ids=[1, 2]"], "--set")
    {'lr': 0.003, 'arch': '784-100-10', 'bias': False, 'ids': [1, 2]}
    """
    from amstream.exceptions import ConfigError

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"`{flag}` takes KEY=VALUE, got `{pair}`")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = {"true": True, "false": False}.get(text.lower(), text)
        out[key] = value
    return out


def expand_arch(text: str, n_inputs: int, n_outputs: int) -> str:
    """``rnn:H`` -> ``{n_inputs}-rnnH-{n_outputs}``: an Elman RNN over the features, one per step."""
    kind, sep, width = text.partition(":")
    if sep and kind.strip().lower() == "rnn":
        return f"{n_inputs}-rnn{width.strip()}-{n_outputs}"
    return text


def config_from_args(args: argparse.Namespace, *, n_inputs: int, n_outputs: int, loss: str = "ce"):
    """Build the AMConfig from --config, the flags and --set, checking sizes against the data."""
    from amstream.config import AMConfig, parse_arch
    from amstream.exceptions import ConfigError

    fields: dict[str, Any] = {}
    if getattr(args, "config", None):
        import tomllib

        with open(args.config, "rb") as fh:
            fields.update(tomllib.load(fh))
    sizes = parse_arch(expand_arch(args.arch, n_inputs, n_outputs) if args.arch else fields.get("arch", (100, 100)))
    if isinstance(sizes, str):  # a network spec: it fixes its own input and output sizes
        from amstream.network import parse_network

        network = parse_network(sizes)
        if (network.n_inputs, network.n_outputs) != (n_inputs, n_outputs):
            raise ConfigError(f"`arch` `{sizes}` takes {network.n_inputs} inputs and gives {network.n_outputs} "
                              f"outputs, but the data has {n_inputs} features and {n_outputs} outputs")
        arch: Any = sizes
    elif args.arch is None and "arch" in fields and len(sizes) >= 2 and sizes[0] == n_inputs:
        arch = sizes
    elif args.arch and len(sizes) >= 2 and sizes[0] == n_inputs and sizes[-1] == n_outputs:
        arch = sizes
    elif args.arch and len(sizes) >= 2 and (sizes[0] != n_inputs or sizes[-1] != n_outputs) and len(sizes) > 2:
        raise ConfigError(f"`--arch {args.arch}` does not fit the data: it has {n_inputs} features and "
                          f"{n_outputs} outputs (give e.g. `{n_inputs}-{'-'.join(map(str, sizes[1:-1]))}-{n_outputs}`"
                          " or hidden sizes only)")
    else:
        arch = (n_inputs, *sizes, n_outputs)
    activation = args.activation.split(",") if "," in args.activation else args.activation
    fields.update(arch=arch, activation=activation, algo=args.algo, seed=args.seed, loss=loss)
    if args.no_bias:
        fields["bias"] = False
    for name in MODEL_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    fields.update(parse_key_values(args.set, "--set"))
    if getattr(args, "lr_decay_epochs", 0) and getattr(args, "batch_size", None):
        n_train = getattr(args, "_n_train", None)
        if n_train:
            per_epoch = 1 if args.algo.endswith("-off") else -(-n_train // args.batch_size)
            fields["lr_decay_every"] = max(1, int(round(args.lr_decay_epochs * per_epoch)))
    try:
        return AMConfig(**fields)
    except TypeError as exc:
        raise ConfigError(f"bad config field: {exc}") from None


def show_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and not args.json and sys.stderr.isatty()


def log(args: argparse.Namespace, message: str) -> None:
    """Human-readable status goes to stderr, so stdout stays clean for --json."""
    print(message, file=sys.stderr, flush=True)


def emit(args: argparse.Namespace, result: dict[str, Any], *, human: str) -> None:
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(human, flush=True)
