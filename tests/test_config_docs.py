"""The option tables are the one source of defaults: where README states a default, it must be the
table's (a changed default fails here until the README says the same)."""
import importlib
import re
from pathlib import Path

import pytest
import yaml

from attack import badnet, blended, sig, wanet
from defense.ulrl import OPTIONS as ULRL
from utils.attacks.run import ATTACK_OPTIONS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PROSE = " ".join(README.split())  # a phrase may wrap across lines


def default(options, key):
    return options[key].default


def num(x) -> str:
    """A number as the README writes it: 0.01, 20, 5e-4."""
    text = f"{x:g}"
    return f"{x:.0e}".replace("e-0", "e-") if len(text) > 5 else text


def option_table_rows():
    """(option names, default cell) of the README's ULRL option table."""
    table = README.split("The main ones:", 1)[1].split("\n\n", 2)[1]
    for line in table.splitlines()[2:]:
        names_cell, default_cell = line.split(" | ")[:2]
        yield re.findall(r"`--(\w+)`", names_cell), default_cell


@pytest.mark.parametrize("names, cell", list(option_table_rows()), ids=lambda v: str(v))
def test_readme_option_table_states_the_tables_defaults(names, cell):
    if len(names) == 1:
        values = [cell]
    else:  # "a, b, c (a note)" or "a / b"
        values = re.split(r", | / ", re.sub(r" \(.*\)$", "", cell))
        assert len(values) == len(names), cell
    for name, text in zip(names, values):
        text = re.sub(r" \(.*\)$", "", text).strip("`")
        if default(ULRL, name) is None:  # prose ("none", "the model's"), never a number or flag
            assert not isinstance(yaml.safe_load(text), (int, float, bool)), (name, text)
        else:
            assert yaml.safe_load(text) == default(ULRL, name), (name, text)


def test_readme_prose_states_the_tables_defaults():
    d = {key: option.default for key, option in ULRL.items()}
    for phrase in (
            # "Where this differs from the public ULRL code"
            f"lr {d['unlearning_lr']} ascent with momentum {d['unlearning_momentum']}, weight decay "
            f"{num(d['unlearning_weight_decay'])}, clipping {num(d['clip_norm'])}, "
            f"MultiStepLR {d['unlearning_milestones']}; CA_min {d['clean_threshold']}",
            f"tau {d['tau']}, ht {d['ht']}",
            f"SGD momentum {d['relearn_momentum']}, no weight decay, cosine schedule, "
            f"{d['relearn_epochs']} epochs",
            f"seeded uniform {d['ratio']:.0%} subset; batch {d['batch_size']}".replace("%", " %"),
            # "Retuning check"
            f"for {d['retune_epochs']} epochs (SGD lr {d['retune_lr']}, momentum 0.9)",
            f"{d['retune_poison_ratio']:.0%} as many poisoned".replace("%", " %")):
        assert phrase in PROSE, phrase


def test_readme_attack_recipe_and_triggers_state_the_tables_defaults():
    a = {key: option.default for key, option in ATTACK_OPTIONS.items()}
    recipe = (f"label {a['attack_target']}, poison ratio {a['pratio']}, SGD lr {a['lr']} / momentum "
              f"{a['momentum']} / weight decay {num(a['weight_decay'])}, cosine schedule, batch "
              f"{a['batch_size']}, {a['epochs']} epochs")
    assert recipe in PROSE
    size = default(badnet.OPTIONS, "patch_size")
    weight = default(blended.OPTIONS, "alpha")
    for phrase in (f"| {size}x{size} white square",
                   f"| {1 - weight:g} image + {weight:g} fixed pattern",
                   f"delta {default(sig.OPTIONS, 'delta'):g}, frequency "
                   f"{default(sig.OPTIONS, 'frequency'):g}",
                   f"(k {default(wanet.OPTIONS, 'k')}, s {default(wanet.OPTIONS, 's')})"):
        assert phrase in README, phrase


def docstring_defaults():
    """(file, key, stated, table default) for every "`key` ... (default V" in an entry point's
    docstring (or the retuning check's)."""
    modules = [f"{p.parent.name}.{p.stem}" for folder in ("defense", "attack")
               for p in sorted((ROOT / folder).glob("*.py"))] + ["utils.defenses.retune"]
    for name in modules:
        module = importlib.import_module(name)
        options = getattr(module, "OPTIONS", None) or module.RETUNE_OPTIONS
        for key, stated in re.findall(r"`(\w+)`[^`(]{0,60}?\(default (-?[0-9.]+)",
                                      module.__doc__ or ""):
            if key in options:
                yield name, key, stated, options[key].default


def test_docstrings_state_the_tables_defaults():
    found = list(docstring_defaults())
    assert len(found) >= 8  # the pattern still finds the statements it is meant to check
    for name, key, stated, table in found:
        first = table[0] if isinstance(table, list) else table  # a range states its first value
        assert float(stated) == first, f"{name}: `{key}` (default {stated}), table {table}"
