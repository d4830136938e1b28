"""Issue 16 design check for robust ULRL's trigger synthesis: does unlearning move clean features
the way the trigger does, and does a perturbation synthesized along that move act like the trigger?

    python bench/ulrl_feature_shift.py --result_file lf_fashion_mnist_preactresnet18_w16 \
        --record_dir DIR [--projection_check --neurons 0 6] [any ULRL option]

Prints, for the record's model (diagnosis only: it reads the test and backdoor sets, which robust
mode never does):
- the cosine between the mean feature shift faithful unlearning causes on the defense images and
  the trigger's mean feature shift (backdoor test images against clean test images), in raw units
  and per feature scaled by its spread on clean test images;
- the synthesized trigger (--synth_rms, default here 0.1): the share of clean test images it
  sends to the target on the original model, and the cosine of its feature shift with the
  trigger's;
- with --purified FILE (a defense_result.pt of this record): how the synthesized trigger moves
  the defense images' predictions on the original model and on that purified one (a trigger-free
  sign of whether a backdoor survived: on LF after robust v4 it still sends them to the target);
- with --projection_check: C-ACC / ASR after reinitializing --neurons and relearning (alpha as
  given) plainly, and with the unlearning shift's direction projected out of the classifier's
  input (the alternative the synthesis replaced).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from defense import ulrl  # noqa: E402
from utils.core.config import parse_config  # noqa: E402
from utils.defenses.run import run_defense  # noqa: E402
from utils.data.record import load_defense_result  # noqa: E402
from utils.defenses.synthesis import classifier_inputs, flip_rate, synthesize_trigger  # noqa: E402
from utils.defenses.unlearning import unlearn  # noqa: E402


@torch.inference_mode()
def features(run, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    run.model.eval()
    return torch.cat([classifier_inputs(run.model, run.linear,
                                        run.preprocess(images[i:i + batch]))[0]
                      for i in range(0, len(images), batch)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projection_check", action="store_true")
    parser.add_argument("--neurons", type=int, nargs="+", default=[0])
    parser.add_argument("--samples", type=int, default=2000, help="test images used")
    parser.add_argument("--purified", type=Path, help="a defense_result.pt of this record")
    args, rest = parser.parse_known_args(argv)
    cfg = parse_config(ulrl.OPTIONS, "feature-shift check",
                       ["--synth_rms", "0.1", *rest, "--plots", "false", "--tag", "featureshift"])

    def defend(run):
        clean_test, bd_test = run.test_sets
        target = int(bd_test.labels[0])
        clean_images, bd_images = clean_test.images[:args.samples], bd_test.images[:args.samples]
        f_clean, f_bd = features(run, clean_images), features(run, bd_images)
        trigger = f_bd.mean(0) - f_clean.mean(0)
        spread = f_clean.std(0).clamp_min(1e-6)
        f_defense = features(run, run.defense_data.images)
        unlearn(run.model, run.batches(), cfg)
        shift = features(run, run.defense_data.images).mean(0) - f_defense.mean(0)
        rows = {"target": target,
                "cos_unlearning_vs_trigger": F.cosine_similarity(shift, trigger, dim=0).item(),
                "cos_unlearning_vs_trigger_scaled": F.cosine_similarity(
                    shift / spread, trigger / spread, dim=0).item()}
        run.model.load_state_dict(run.original_state())
        inputs = run.preprocess(run.defense_data.images)
        delta = synthesize_trigger(run.model, run.linear, inputs, shift, run.preprocess.std, cfg)
        with torch.inference_mode():
            x = run.preprocess(clean_images)
            moved, logits = classifier_inputs(run.model, run.linear, x + delta)
        rows["synthesized_to_target"] = (logits.argmax(1) == target).float().mean().item()
        rows["cos_synthesized_vs_trigger"] = F.cosine_similarity(
            moved.mean(0) - f_clean.mean(0), trigger, dim=0).item()
        if args.purified:
            rows["flips_original"] = flip_rate(run.model, inputs, delta, 256)
            state = load_defense_result(args.purified)["model"]
            run.model.load_state_dict({k: v.to(run.device) for k, v in state.items()})
            rows["flips_purified"] = flip_rate(run.model, inputs, delta, 256)
        if args.projection_check:
            unit = (shift / shift.norm())[None]
            for name, hook in (("plain", None), ("projected", lambda m, i: (
                    i[0] - (i[0] @ unit.T) @ unit,))):
                run.model.load_state_dict(run.original_state())
                handle = hook and run.linear.register_forward_pre_hook(hook)
                ulrl.reinitialize_and_relearn(run.model, run.linear, run.batches(),
                                              args.neurons, cfg)
                metrics = run.evaluate()
                if handle:
                    handle.remove()
                rows.update({f"{name}_{k}": v for k, v in metrics.items()})
        for k, v in rows.items():
            print(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}", flush=True)
        return {"feature_shift": rows}

    run_defense(cfg, "ulrl", defend)


if __name__ == "__main__":
    main()
