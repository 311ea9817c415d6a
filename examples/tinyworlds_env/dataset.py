"""Synthetic frames in the format of TinyWorlds' PONG loader.

`data/pong_frames.h5`, dataset `frames`: N x 64 x 64 x 3 uint8, read by
TinyWorlds' `VideoHDF5Dataset` (which then samples every 4th frame at the
loader's default 15 fps). Each frame shows a dark court with a dashed centre
line, a ball that bounces off the walls, an opponent paddle that follows the
ball, and a controllable agent: a yellow block that moves 3 px per frame in
the direction of its action (0 up, 1 down, 2 left, 3 right), held for
`hold` frames at a time. The actions are stored beside the frames as
dataset `actions` (the loader ignores it), so what the latent action model
should discover is known.

    python dataset.py OUT.h5 [--frames 4000] [--seed 0] [--hold 4]
"""
from __future__ import annotations

import argparse

import numpy as np

SIZE = 64
MOVES = np.array([(-3, 0), (3, 0), (0, -3), (0, 3)])  # (dy, dx) per action
AGENT, BALL, PADDLE = 10, 5, (18, 4)


def render(frames: int, seed: int, hold: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = np.zeros((frames, SIZE, SIZE, 3), dtype=np.uint8)
    actions = np.repeat(rng.integers(0, len(MOVES), -(-frames // hold)), hold)[:frames]
    agent = np.array([SIZE // 2, SIZE // 4])
    ball = rng.uniform(8, SIZE - 8, 2)
    vel = rng.choice([-1.5, 1.5], 2)
    for i in range(frames):
        f = out[i]
        f[:] = (16, 40, 24)
        f[::8, SIZE // 2 - 1:SIZE // 2 + 1] = (150, 150, 150)
        agent = np.clip(agent + MOVES[actions[i]], 0, SIZE - AGENT)
        ball += vel
        for axis in (0, 1):
            if ball[axis] < 1 or ball[axis] > SIZE - BALL - 1:
                vel[axis] = -vel[axis]
                ball[axis] = np.clip(ball[axis], 1, SIZE - BALL - 1)
        paddle_y = int(np.clip(ball[0] - PADDLE[0] / 2, 0, SIZE - PADDLE[0]))
        f[paddle_y:paddle_y + PADDLE[0], SIZE - 5:SIZE - 5 + PADDLE[1]] = (40, 220, 220)
        by, bx = ball.astype(int)
        f[by:by + BALL, bx:bx + BALL] = (255, 255, 255)
        ay, ax = agent
        f[ay:ay + AGENT, ax:ax + AGENT] = (235, 210, 40)
    return out, actions.astype(np.uint8)


def write(path: str, frames: int = 4000, seed: int = 0, hold: int = 4) -> None:
    import h5py
    data, actions = render(frames, seed, hold)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("frames", data=data, compression="lzf")
        h5.create_dataset("actions", data=actions)
        h5.attrs["generator"] = "tinyworlds-training-diagnostics examples/tinyworlds_env/dataset.py"
        h5.attrs.update({"seed": seed, "hold": hold})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--frames", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hold", type=int, default=4)
    a = ap.parse_args()
    write(a.out, a.frames, a.seed, a.hold)
