"""Generate the small synthetic preference data set used by the examples.

Each row is ``{"prompt": ..., "chosen": ..., "rejected": ...}``. The chosen answer is helpful and
polite; the rejected answer is dismissive, rude, off-topic or a refusal. Lengths are mixed so that
the rejected answer is the longer one in roughly 40% of pairs, which keeps length from being an
easy shortcut. Eval rows use topics that never appear in the train rows.

Run from the repository root::

    python scripts/make_example_data.py
"""

import json
import random
import re
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "examples" / "data"
N_TRAIN = 800
N_EVAL = 200
REJECTED_LONGER_FRACTION = 0.4
MAX_ROW_WORDS = 60
EVAL_TOPIC_EVERY = 5  # every fifth topic is held out for the eval split

# One topic per line: "task | subject | step one; step two; step three". Steps are imperative
# phrases that read well after "first" / "then".
TOPIC_TABLE = """
boil an egg | eggs | bring a pot of water to a boil; lower the egg in gently; cook it for nine minutes
make a cup of tea | tea | heat fresh water; steep the tea bag for three minutes; add milk if you like
bake bread | bread | mix flour, water, salt and yeast; let the dough rise for an hour; bake it until golden
cook rice | rice | rinse the rice well; simmer it with twice as much water; let it rest covered
make pancakes | pancakes | whisk flour, eggs and milk; heat a buttered pan; flip each one when it bubbles
brew coffee | coffee | grind the beans fresh; pour hot water over the grounds slowly; let it drip
make a salad | salad | wash and dry the greens; chop some vegetables; toss it all with dressing
roast vegetables | vegetables | cut them into even pieces; coat them in oil and salt; roast them hot
change a flat tire | tires | loosen the lug nuts; jack up the car; swap in the spare tire
clean a bathroom | bathrooms | clear the counters; spray the surfaces with cleaner; scrub and rinse
paint a wall | painting | tape the edges; apply a coat of primer; roll on two thin coats of paint
fix a leaky faucet | faucets | shut off the water supply; take the handle apart; replace the worn washer
hang a picture | pictures | find a stud or use an anchor; mark the height; drive in a nail at an angle
unclog a drain | drains | pour boiling water down it; try a plunger; use a drain snake if needed
grow tomatoes | tomatoes | pick a sunny spot; plant them in rich soil; water them deeply twice a week
care for a houseplant | houseplants | check the light it needs; water it when the soil is dry; feed it monthly
plant a tree | trees | dig a hole twice as wide as the roots; set the tree in level; water it well
start a compost pile | compost | choose a shady corner; layer greens and browns; turn the pile every week
learn to swim | swimming | get comfortable in shallow water; practice floating; work on kicking with a board
start running | running | get good shoes; mix walking and jogging; add a few minutes each week
do a push-up | push-ups | place your hands under your shoulders; keep your body straight; lower slowly
stretch after a workout | stretching | hold each stretch for thirty seconds; breathe slowly; never bounce
improve my sleep | sleep | keep a regular bedtime; avoid screens before bed; keep the room cool and dark
drink more water | water | carry a refillable bottle; drink a glass with each meal; set small reminders
write a resume | resumes | list your recent jobs; highlight clear results; keep it to one page
prepare for a job interview | interviews | research the company; practice common questions; plan your outfit
ask for a raise | raises | collect examples of your results; check typical pay; book a calm meeting
write a cover letter | cover letters | address the hiring manager; explain why you fit; keep it short
make a budget | budgets | write down your income; track your spending for a month; set limits by category
save money on groceries | groceries | plan meals for the week; make a shopping list; buy store brands
open a savings account | savings | compare interest rates; bring your ID to the bank; set up auto deposits
pay off debt | debt | list every debt; pay the highest interest first; avoid adding new charges
learn a language | languages | study a little daily; learn common words first; talk with native speakers
study for an exam | exams | make a study schedule; review your notes daily; take practice tests
take better notes | notes | write in your own words; use short headings; review them the same day
read more books | reading | keep a book with you; read ten pages a day; join a book club
learn to code | coding | pick one language like Python; build tiny projects; read other people's code
back up my files | backups | pick an external drive or cloud service; copy your key folders; automate it
make a strong password | passwords | use a long phrase; mix in numbers and symbols; use a password manager
speed up my laptop | laptops | close unused programs; remove startup apps; free up disk space
set up home wifi | networks | place the router centrally; change the admin password; update the firmware
take a good photo | photos | use natural light; follow the rule of thirds; hold the camera steady
train a puppy to sit | puppies | hold a treat above its nose; move it back slowly; reward it when it sits
give a cat a bath | cats | trim its claws first; use lukewarm water; dry it with a soft towel
walk a dog on a leash | dogs | use a comfortable harness; stop when it pulls; reward it for walking beside you
set up a fish tank | fish tanks | rinse the gravel; cycle the water for a few weeks; add a few fish at a time
plan a trip | travel | pick your dates; set a budget; book places to stay early
pack a suitcase | packing | lay out everything first; roll your clothes; put heavy items near the wheels
beat jet lag | jet lag | shift your sleep before the flight; drink plenty of water; get sunlight on arrival
pitch a tent | tents | pick flat ground; lay out the footprint; stake the corners before raising it
tie a tie | ties | drape it with the wide end longer; cross it over twice; pull it through the loop
iron a shirt | shirts | start with the collar; iron the cuffs and sleeves; finish with the body
remove a coffee stain | stains | blot it right away; rinse with cold water; dab on a little dish soap
sew on a button | buttons | thread and knot the needle; stitch through the holes a few times; tie it off
make new friends | friends | join a club or class; ask people simple questions; follow up with a message
give a good speech | speeches | know your main point; practice out loud; make eye contact with the room
apologize to a friend | apologies | admit what you did; say you are sorry plainly; ask how to make it right
stop procrastinating | procrastination | break the task into small steps; start a timer; reward yourself
learn to meditate | meditation | sit somewhere quiet; focus on your breathing; start with five minutes
keep my desk organized | desks | clear everything off; keep only daily items; give each thing a spot
"""

Topic = tuple[str, str, tuple[str, str, str]]


def parse_topics(table: str) -> list[Topic]:
    """Parse ``TOPIC_TABLE`` into ``(task, subject, steps)`` tuples."""
    topics: list[Topic] = []
    for line in table.strip().splitlines():
        task, subject, steps = (part.strip() for part in line.split("|"))
        s1, s2, s3 = (step.strip() for step in steps.split(";"))
        topics.append((task, subject, (s1, s2, s3)))
    return topics


TOPICS = parse_topics(TOPIC_TABLE)

PROMPT_TEMPLATES = [
    "Question: How do I {task}?\nAnswer:",
    "Question: What is the best way to {task}?\nAnswer:",
    "Question: Can you tell me how to {task}?\nAnswer:",
    "Question: I want to {task}. Where should I start?\nAnswer:",
    "Question: Any tips on how to {task}?\nAnswer:",
    "Question: What's the easiest way to {task}?\nAnswer:",
    "Question: Could you explain how to {task}?\nAnswer:",
    "Question: I have never tried to {task} before. How does it work?\nAnswer:",
]

CHOSEN_TEMPLATES = [
    # short
    " Sure, first {s1}. Hope that helps!",
    " Happy to help: just {s1}, then {s2}.",
    " Good question. First, {s1}. You will get the hang of it.",
    " Of course! Start simple and {s1}. Good luck!",
    # medium
    " Sure, to {task} you should first {s1}. Then {s2}. Hope this helps!",
    " Of course! The easiest way to {task} is to {s1}, then {s2}. Good luck!",
    " Great question. Begin when you are ready: {s1}. After that, {s2}. {tip}",
    " Glad you asked. If you want to {task}, the key is to {s1} and then {s2}.",
    # long
    " Happy to help with that. To {task}, first {s1}. Next, {s2}, and finally {s3}. {tip} "
    "Let me know if you have any other questions.",
    " Sure thing! Here is a simple way to {task}: {s1}, then {s2}, and then {s3}. {tip} "
    "Good luck, you have got this.",
    " That is a great thing to learn. Step one: {s1}. Step two: {s2}. Step three: {s3}. {tip}",
]

TIPS = [
    "Take it slowly the first time.",
    "It gets easier with practice.",
    "Be patient and check your progress as you go.",
    "Do not worry if it is not perfect at first.",
    "A little preparation makes it much easier.",
    "Feel free to ask a follow-up question.",
]

DISMISSALS = [
    "I don't know, figure it out yourself.",
    "Whatever. Ask someone else.",
    "No idea. Not my problem.",
    "Ugh, just google it.",
    "Why would I care?",
    "Stop bothering me.",
    "Not interested.",
    "Go away.",
]

OFF_TOPIC = [
    "My cousin bought a red bicycle last summer and never rode it once.",
    "The weather on Mars is extremely cold and dusty most of the year.",
    "I think pineapple on pizza is overrated, but people keep ordering it anyway.",
    "There is a new show about dragons that everyone keeps talking about.",
    "Penguins cannot fly, which seems like a strange choice for a bird.",
    "I once spent a whole afternoon counting the tiles on my kitchen floor.",
    "The moon is slowly drifting away from the earth every single year.",
    "My neighbor's cat sleeps on my car every morning for some reason.",
]

REJECTED_TEMPLATES = [
    # short
    " {dismiss}",
    " {dismiss} {dismiss2}",
    # medium
    " I'm not going to explain how to {task}. Figure it out on your own.",
    " Honestly, that's a dumb question. Anyone can {task} without help.",
    " I won't help with {subject}. Ask somebody who actually cares.",
    " Seriously? You can't {task}? That's kind of sad, to be honest.",
    " {off1}",
    " I refuse to talk about {subject}. {dismiss}",
    # long
    " {off1} {off2}",
    " Why would anyone even want to {task}? It's a waste of time, and I have better things to do "
    "than walk you through something so boring. Go read a manual or ask someone else.",
    " Look, I really don't feel like answering questions about {subject} today. It's boring, it's "
    "obvious, and you should have figured it out by now. {dismiss}",
    " {off1} Anyway, I don't know how to {task} and I don't really care. {dismiss}",
    " You again? I already told you I'm not helping with {subject}. Stop asking me these silly "
    "questions and leave me alone. {dismiss}",
]


def word_count(text: str) -> int:
    """Return the number of whitespace-separated words in ``text``."""
    return len(text.split())


def make_chosen(rng: random.Random, task: str, steps: tuple[str, str, str]) -> str:
    """Fill a random helpful answer template for one topic."""
    template = rng.choice(CHOSEN_TEMPLATES)
    return template.format(task=task, s1=steps[0], s2=steps[1], s3=steps[2], tip=rng.choice(TIPS))


def make_rejected(rng: random.Random, task: str, subject: str) -> str:
    """Fill a random unhelpful answer template for one topic."""
    template = rng.choice(REJECTED_TEMPLATES)
    dismiss, dismiss2 = rng.sample(DISMISSALS, 2)
    off1, off2 = rng.sample(OFF_TOPIC, 2)
    return template.format(
        task=task, subject=subject, dismiss=dismiss, dismiss2=dismiss2, off1=off1, off2=off2
    )


def make_row(rng: random.Random, topic: Topic) -> dict[str, str]:
    """Build one preference row whose length ordering follows a random draw (rejected longer ~40%)."""
    task, subject, steps = topic
    prompt = rng.choice(PROMPT_TEMPLATES).format(task=task)
    task = re.sub(r"\bmy\b", "your", task)  # answers address the user: "improve your sleep"
    want_rejected_longer = rng.random() < REJECTED_LONGER_FRACTION
    while True:
        chosen = make_chosen(rng, task, steps)
        rejected = make_rejected(rng, task, subject)
        n_prompt, n_chosen, n_rejected = word_count(prompt), word_count(chosen), word_count(rejected)
        if n_prompt + max(n_chosen, n_rejected) > MAX_ROW_WORDS or n_chosen == n_rejected:
            continue
        # Require word and character counts to agree, so "longer" is unambiguous.
        if (n_rejected > n_chosen) != (len(rejected) > len(chosen)):
            continue
        if (n_rejected > n_chosen) == want_rejected_longer:
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def make_split(rng: random.Random, topics: list[Topic], n_rows: int) -> list[dict[str, str]]:
    """Build ``n_rows`` distinct rows, cycling over ``topics`` in a shuffled order."""
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    while len(rows) < n_rows:
        order = list(topics)
        rng.shuffle(order)
        for topic in order:
            if len(rows) == n_rows:
                break
            row = make_row(rng, topic)
            key = (row["prompt"], row["chosen"], row["rejected"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write ``rows`` as one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    """Generate ``prefs_train.jsonl`` and ``prefs_eval.jsonl`` under ``examples/data``."""
    rng = random.Random(0)
    train_topics = [t for i, t in enumerate(TOPICS) if i % EVAL_TOPIC_EVERY != EVAL_TOPIC_EVERY - 1]
    eval_topics = [t for i, t in enumerate(TOPICS) if i % EVAL_TOPIC_EVERY == EVAL_TOPIC_EVERY - 1]
    splits = {"prefs_train.jsonl": make_split(rng, train_topics, N_TRAIN)}
    splits["prefs_eval.jsonl"] = make_split(rng, eval_topics, N_EVAL)
    for name, rows in splits.items():
        path = OUT_DIR / name
        write_jsonl(path, rows)
        longer = sum(word_count(r["rejected"]) > word_count(r["chosen"]) for r in rows)
        print(f"wrote {len(rows)} rows to {path} (rejected longer in {longer / len(rows):.0%})")


if __name__ == "__main__":
    main()
