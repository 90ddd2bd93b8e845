"""CE-CLIP with swapped adjectives in place of its replaced-adjective negatives (a diagnostic script, not a test).

    python -m lab.diag_cehn_attribute_swap --seed 0 --steps 1000 --train-size 20000 --out DIR   (any cehn.py flag)

CE-CLIP's four negative types (`data.CEHN_TYPES`: relation, attribute, object, action) include no attribute swap:
its "attribute" negative replaces an adjective by another ("a red circle" -> "a blue circle"), which a model can
refuse by colour alone, while SWAP's swap_att and ARO's attribute set exchange two objects' adjectives ("a red
circle and a blue square" -> "a blue circle and a red square"), which only binding refuses. NegCLIP's negatives
include that swap. Here the "attribute" slot gets DeGLA's `swap_adjs` rule instead; nothing else changes (the
threshold theta of that slot, the loss, every flag; one process only: spawned workers would not see the change).
If the missing swap is why CE-CLIP trails NegCLIP on attribute binding, swap_att and aro_attribute should rise.
Result (seed 0, the comparison's budget of 1000 steps on 20,000 scenes, as the command above): docs/results_cehn.md.
"""
import sys

import cehn
import data

if __name__ == "__main__":
    data.CEHN_TYPES = ("relation", "swap_adjs", "object", "action")
    sys.argv = ["cehn.py", *sys.argv[1:]]
    cehn.main()
