#!/usr/bin/env python
"""Generate the synthetic LaMP-format sample that ships with cdcda-export (seeded, reproducible).

    python scripts/make_sample_data.py [--out cdcda_export/assets/lamp_sample] [--seed 0]

Each task gets a few users with consistent personal preferences (a critic who rates low, a fan who
tags sci-fi, a headline writer who asks questions...), so a per-user adapter has something to learn.
This is SYNTHETIC sample data in LaMP's file format, not LaMP data.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = {
    "space": ["orbit", "rocket", "telescope", "galaxy", "astronaut", "launch", "planet", "satellite", "comet", "moon"],
    "food": ["recipe", "bread", "coffee", "kitchen", "spice", "harvest", "bakery", "dinner", "tomato", "olive"],
    "sport": ["match", "coach", "league", "stadium", "goal", "season", "runner", "trophy", "team", "score"],
    "tech": ["software", "chip", "network", "battery", "robot", "cloud", "startup", "sensor", "code", "device"],
    "music": ["album", "guitar", "concert", "singer", "melody", "band", "festival", "piano", "chorus", "vinyl"],
    "health": ["doctor", "sleep", "diet", "exercise", "clinic", "vaccine", "heart", "stress", "walking", "nurse"],
}
ADJ = ["new", "quiet", "bright", "old", "strange", "bold", "local", "small", "huge", "careful", "rapid", "gentle"]
VERBS = ["changes", "reveals", "improves", "breaks", "tests", "shapes", "explores", "challenges", "builds", "finds"]
FILLER = ["the", "a", "this", "every", "our", "their"]


def sentence(rng: random.Random, topic: str, n: int = 10) -> str:
    words = TOPICS[topic]
    out = []
    for _ in range(n // 5 + 1):
        out.append(f"{rng.choice(FILLER)} {rng.choice(ADJ)} {rng.choice(words)} {rng.choice(VERBS)} "
                   f"{rng.choice(FILLER)} {rng.choice(words)}")
    s = ", ".join(out)
    return s[0].upper() + s[1:] + "."


def paragraph(rng, topic, k=3):
    return " ".join(sentence(rng, topic, rng.randint(6, 12)) for _ in range(k))


def title(rng, topic, style):
    w = TOPICS[topic]
    base = f"{rng.choice(ADJ)} {rng.choice(w)} {rng.choice(VERBS)} {rng.choice(w)}"
    if style == "question":
        return f"Why the {base}?".capitalize()
    if style == "colon":
        return f"{rng.choice(w).capitalize()}: a {base}"
    if style == "caps":
        return base.upper()
    return base.capitalize()


# --------------------------------------------------------------------------- tasks
def lamp1(rng, n_users, n_prof):
    from cdcda_export.data.tasks import Q_LAMP1

    users, golds = [], []
    topics = list(TOPICS)
    for u in range(n_users):
        topic = topics[u % len(topics)]
        prof = [{"id": f"{100 + u}{j:02d}", "title": title(rng, topic, "plain"), "abstract": paragraph(rng, topic, 2)}
                for j in range(n_prof)]
        other = topics[(u + 3) % len(topics)]
        pos, neg = title(rng, topic, "plain"), title(rng, other, "plain")
        first = rng.random() < 0.5
        q = Q_LAMP1.format(title=title(rng, topic, "plain"), ref1=pos if first else neg, ref2=neg if first else pos)
        uid = str(1000 + u)
        users.append({"id": uid, "input": q, "profile": prof})
        golds.append({"id": uid, "output": "[1]" if first else "[2]"})
    return users, golds


def lamp2(rng, n_users, n_prof):
    from cdcda_export.data.tasks import LAMP2_MOVIE_TAGS, Q_LAMP2

    favs = [["sci-fi", "dystopia"], ["comedy", "dark comedy"], ["romance", "classic"], ["action", "violence"],
            ["psychology", "thought-provoking"], ["fantasy", "based on a book"]]
    users, golds = [], []
    for u in range(n_users):
        fav = favs[u % len(favs)]
        topic = list(TOPICS)[u % len(TOPICS)]
        prof = []
        for j in range(n_prof):
            tag = rng.choice(fav) if rng.random() < 0.85 else rng.choice(LAMP2_MOVIE_TAGS)
            prof.append({"id": f"{200 + u}{j:02d}", "description": f"A {tag} film. " + paragraph(rng, topic, 1), "tag": tag})
        gold = fav[0]
        uid = str(2000 + u)
        users.append({"id": uid, "input": Q_LAMP2.format(text=f"A {gold} story. " + paragraph(rng, topic, 1)), "profile": prof})
        golds.append({"id": uid, "output": gold})
    return users, golds


def lamp3(rng, n_users, n_prof):
    from cdcda_export.data.tasks import Q_LAMP3

    styles = [(1, 2, "awful"), (4, 5, "wonderful"), (3, 3, "fine"), (2, 3, "mediocre"), (5, 5, "perfect")]
    users, golds = [], []
    for u in range(n_users):
        lo, hi, word = styles[u % len(styles)]
        topic = list(TOPICS)[(u + 1) % len(TOPICS)]
        prof = [{"id": f"{300 + u}{j:02d}", "text": f"Honestly {word}. " + paragraph(rng, topic, 1),
                 "score": str(rng.randint(lo, hi))} for j in range(n_prof)]
        uid = str(3000 + u)
        gold = str(rng.randint(lo, hi))
        users.append({"id": uid, "input": Q_LAMP3.format(text=f"Honestly {word}. " + paragraph(rng, topic, 1)), "profile": prof})
        golds.append({"id": uid, "output": gold})
    return users, golds


def _gen_task(rng, n_users, n_prof, template, key_text, styles, uid_base, text_fn, title_key="title"):
    users, golds = [], []
    for u in range(n_users):
        style = styles[u % len(styles)]
        topic = list(TOPICS)[(u + 2) % len(TOPICS)]
        prof = [{"id": f"{uid_base // 10 + u}{j:02d}", key_text: text_fn(rng, topic), title_key: title(rng, topic, style)}
                for j in range(n_prof)]
        uid = str(uid_base + u)
        users.append({"id": uid, "input": template.format(text=text_fn(rng, topic)), "profile": prof})
        golds.append({"id": uid, "output": title(rng, topic, style)})
    return users, golds


def lamp4(rng, n_users, n_prof):
    from cdcda_export.data.tasks import Q_LAMP4

    return _gen_task(rng, n_users, n_prof, Q_LAMP4, "text", ["question", "caps", "plain", "colon"], 4000,
                     lambda r, t: paragraph(r, t, 2))


def lamp5(rng, n_users, n_prof):
    from cdcda_export.data.tasks import Q_LAMP5

    return _gen_task(rng, n_users, n_prof, Q_LAMP5, "abstract", ["colon", "plain", "question", "caps"], 5000,
                     lambda r, t: paragraph(r, t, 3))


def lamp7(rng, n_users, n_prof):
    from cdcda_export.data.tasks import Q_LAMP7, _style_strip

    def tweet(r, topic, style):
        s = sentence(r, topic, r.randint(5, 9)).rstrip(".")
        w = r.choice(TOPICS[topic])
        if style == "hype":
            return s.upper() + "!!! #" + w
        if style == "lower":
            return s.lower() + " lol"
        if style == "polite":
            return "Thank you all: " + s + ". Have a lovely day."
        return s + ". @" + w + "fan"

    styles = ["hype", "lower", "polite", "mention"]
    users, golds = [], []
    for u in range(n_users):
        style = styles[u % len(styles)]
        topic = list(TOPICS)[(u + 3) % len(TOPICS)]
        prof = [{"id": f"{700 + u}{j:02d}", "text": tweet(rng, topic, style)} for j in range(n_prof)]
        gold = tweet(rng, topic, style)
        uid = str(7000 + u)
        users.append({"id": uid, "input": Q_LAMP7.format(text=_style_strip(gold)), "profile": prof})
        golds.append({"id": uid, "output": gold})
    return users, golds


BUILDERS = {"LaMP-1": lamp1, "LaMP-2": lamp2, "LaMP-3": lamp3, "LaMP-4": lamp4, "LaMP-5": lamp5, "LaMP-7": lamp7}

README = """# Synthetic LaMP-format sample data

**This is synthetic sample data generated by `scripts/make_sample_data.py` (seed {seed}), not LaMP data.**
It uses LaMP's file format (`questions.json`: list of `{{id, input, profile}}`; `outputs.json`:
`{{task, golds: [{{id, output}}]}}`) for tasks LaMP-1, 2, 3, 4, 5 and 7, with {n_users} users per task
and {n_prof} profile items per user. Each user has a consistent preference (a critic who always rates
low, a viewer who tags sci-fi, a headline writer who asks questions, a tweeter in capitals...), so a
per-user LoRA adapter has something to learn. Regenerate with:

    python scripts/make_sample_data.py --seed {seed}

The real LaMP data is at https://lamp-benchmark.github.io (download it yourself; this tool never
downloads data).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "cdcda_export" / "assets" / "lamp_sample"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--profile-items", type=int, default=20)
    a = ap.parse_args()
    out = Path(a.out)
    from cdcda_export.data.tasks import get_task

    for task, fn in BUILDERS.items():
        rng = random.Random(f"{a.seed}-{task}")
        users, golds = fn(rng, a.users, a.profile_items)
        d = out / task
        d.mkdir(parents=True, exist_ok=True)
        (d / "questions.json").write_text(json.dumps(users, indent=1) + "\n", encoding="utf-8")
        (d / "outputs.json").write_text(json.dumps({"task": get_task(task).official_name, "golds": golds}, indent=1) + "\n",
                                        encoding="utf-8")
    (out / "README.md").write_text(README.format(seed=a.seed, n_users=a.users, n_prof=a.profile_items), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
