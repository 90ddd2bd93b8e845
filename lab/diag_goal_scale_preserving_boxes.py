"""GOAL on the shapes world with scale-preserving candidate boxes (a diagnostic script, not a test).

    python -m lab.diag_goal_scale_preserving_boxes --seed 0 --steps 1000 --train-size 20000 --out DIR

The shapes world's candidate boxes (`ShapesDataset`'s "segments") are each object's tight box, and GOAL resizes a
crop to the full image. So a small object (radius 0.11 of the image side) and a large one (0.18) fill their
crops alike, while the local sentence still says "small" or "large". Here every candidate is a square of one
side instead (SIDE = 0.40 of the image: a large object's box plus a margin), centred on its object and shifted
inside the image, so every crop is enlarged by the same factor and a small object stays smaller than a large one.
That is the only change: the boxes LISM chooses from, and so the local pairs' crops and TSL's patches. Every
other flag is goal.py's. The LISM cache key includes the candidate boxes, so this run makes its own matching.
Result (seed 0, the comparison's budget of 1000 steps on 20,000 scenes, as the command above): docs/results_goal.md.
"""
import sys

import data
import goal

SIDE = 0.40


def _scale_preserving_boxes(self, index):
    n, half = self.image_size, SIDE * self.image_size / 2
    boxes = []
    for o in self.scenes[index]:
        cx, cy = min(max(o.cx * n, half), n - half), min(max(o.cy * n, half), n - half)
        boxes.append([cx - half, cy - half, cx + half, cy + half])
    return boxes


if __name__ == "__main__":
    data.ShapesDataset.candidate_boxes = _scale_preserving_boxes
    sys.argv = ["goal.py", *sys.argv[1:]]
    goal.main()
