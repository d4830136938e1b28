"""Issue 16 design check for robust ULRL: one synthesized trigger per sink round.

    python bench/ulrl_round_triggers.py --result_file R --record_dir DIR \
        --yaml_path config/defense/ulrl/fashion_mnist.yaml [--purified DIR/R/defense/ulrl_robust/defense_result.pt] \
        [--relearn_round K --neurons 0 7 --alpha 1]

It was version 7's design check (robust mode now synthesizes and gates one trigger per round). It
runs the sink rounds as robust mode does (ulrl.find_sinks), synthesizes a trigger along every round's shift and prints
where each sends the defense images on the original model and, with --purified, on that model (a
robust run whose gate kept its plain relearning is the plainly relearned model, so this is what a
per-round gate would read). With --relearn_round K the run then relearns from the original weights
against round K's trigger (each batch plus its copy under it, true labels; --neurons reinitialized,
ULRL's --alpha), and its C-ACC / ASR are the usual evaluation. Files go to defense/ulrl_roundtrig/.
Any other ULRL option is passed on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defense import ulrl  # noqa: E402
from utils.core.config import parse_config  # noqa: E402
from utils.data.record import load_defense_result  # noqa: E402
from utils.defenses.run import run_defense  # noqa: E402
from utils.defenses.synthesis import flip_rate, synthesize_trigger, with_perturbed_copies  # noqa: E402
from utils.training.train import eval_batch_size  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purified", help="defense_result.pt of a purified model to apply the triggers to")
    parser.add_argument("--relearn_round", type=int, help="relearn against this round's trigger")
    parser.add_argument("--neurons", type=int, nargs="+", default=[],
                        help="classifier rows reinitialized with --relearn_round")
    args, rest = parser.parse_known_args(argv)
    cfg = parse_config(ulrl.OPTIONS, "per-round trigger check",
                       [*rest, "--plots", "false", "--tag", "roundtrig"])

    def defend(run):
        batch = eval_batch_size(cfg.eval_batch_size, run.device)
        inputs = run.preprocess(run.defense_data.images)
        rounds, shifts = ulrl.find_sinks(run, cfg.sink_rounds, inputs)
        run.model.load_state_dict(run.original_state())
        triggers = [synthesize_trigger(run.model, run.linear, inputs, shift, run.preprocess.std, cfg)
                    for shift in shifts]
        rows = [{"round": r["round"], "sink": r["sink"],
                 "original": flip_rate(run.model, inputs, delta, batch)["class_shares"]}
                for r, delta in zip(rounds, triggers)]
        if args.purified:
            state = load_defense_result(args.purified)["model"]
            run.model.load_state_dict({k: v.to(run.device) for k, v in state.items()})
            for row, delta in zip(rows, triggers):
                row["purified"] = flip_rate(run.model, inputs, delta, batch)["class_shares"]
        for row in rows:
            print(f"round {row['round']} (sink {row['sink']}): shares of the defense images per "
                  "class under its trigger: " + "; ".join(
                      f"{when} " + " ".join(f"{share:.3f}" for share in row[when])
                      for when in ("original", "purified") if when in row), flush=True)
        run.model.load_state_dict(run.original_state())
        if args.relearn_round is not None:
            ulrl.reinitialize_and_relearn(run.model, run.linear, run.batches(), args.neurons, cfg,
                                          transform=with_perturbed_copies(
                                              triggers[args.relearn_round]))
        return {"round_triggers": rows, "relearned_against_round": args.relearn_round,
                "flagged_neurons": [{"neuron": j} for j in args.neurons]}

    run_defense(cfg, "ulrl", defend)


if __name__ == "__main__":
    main()
