"""A deterministic synthetic corpus for pretraining Lamina's tiny base model.

Why synthetic: Lamina must run offline (no model hub), so it builds its own small base model.
For continual learning to be meaningful, that model's hidden states need general structure a
small LoRA adapter can reuse: word classes, topics, sentiment, spelling, counting, small-number
arithmetic, key/value records and question/answer lines. The corpus teaches those *facts and
skills* in natural-language templates; the task suite (``trainer.suite``) asks for the same
skills in a different, terse template (``"name: input ->"``), so no suite example occurs in
the corpus verbatim and an adapter has to learn the format, not recall text.

The word tables here (the lexicon) are shared with the suite so that every suite input is made
of words the tokenizer and the model have seen.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator

# --------------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------------

TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "sports": (
        "goal", "team", "coach", "match", "ball", "score", "player", "league", "referee",
        "stadium", "tennis", "soccer", "racket", "sprint", "medal", "trophy", "season",
        "pitch", "keeper", "striker", "tackle", "umpire", "court", "inning", "relay",
    ),
    "food": (
        "bread", "cheese", "soup", "salad", "pasta", "apple", "butter", "garlic", "pepper",
        "onion", "recipe", "oven", "kitchen", "dinner", "lunch", "noodle", "sauce", "rice",
        "lemon", "honey", "carrot", "cookie", "spoon", "baker", "flour",
    ),
    "weather": (
        "rain", "cloud", "storm", "wind", "snow", "sunny", "thunder", "fog", "frost", "breeze",
        "forecast", "humid", "drizzle", "hail", "rainbow", "climate", "umbrella", "lightning",
        "gust", "mist", "sleet", "flood", "drought", "chilly", "heatwave",
    ),
    "music": (
        "guitar", "piano", "song", "melody", "drum", "violin", "choir", "concert", "rhythm",
        "chord", "singer", "album", "band", "lyric", "tempo", "jazz", "opera", "flute",
        "trumpet", "chorus", "harmony", "ballad", "tune", "note", "cello",
    ),
    "science": (
        "atom", "cell", "energy", "physics", "biology", "experiment", "theory", "molecule",
        "gravity", "laser", "protein", "planet", "telescope", "microscope", "electron",
        "galaxy", "chemist", "formula", "lab", "neuron", "orbit", "fossil", "enzyme",
        "quantum", "magnet",
    ),
    "travel": (
        "airport", "passport", "hotel", "luggage", "flight", "ticket", "train", "beach",
        "tourist", "museum", "journey", "suitcase", "map", "visa", "cruise", "harbor",
        "island", "guide", "hostel", "voyage", "border", "station", "taxi", "resort", "route",
    ),
}  # fmt: skip

POSITIVE_WORDS: tuple[str, ...] = (
    "great", "excellent", "wonderful", "amazing", "lovely", "perfect", "fantastic", "pleasant",
    "superb", "delightful", "brilliant", "reliable", "comfortable", "friendly", "tasty",
    "charming", "solid", "helpful", "gorgeous", "smooth",
)  # fmt: skip

NEGATIVE_WORDS: tuple[str, ...] = (
    "terrible", "awful", "horrible", "broken", "poor", "boring", "rude", "dirty", "noisy",
    "slow", "disappointing", "useless", "bland", "faulty", "flimsy", "greasy", "ugly",
    "annoying", "unreliable", "painful",
)  # fmt: skip

REVIEW_ITEMS: tuple[str, ...] = (
    "phone", "movie", "hotel", "blender", "laptop", "restaurant", "book", "chair", "jacket",
    "camera", "headset", "game", "pizza", "service", "shoes", "sofa", "watch", "bike",
    "printer", "kettle",
)  # fmt: skip

# Nouns with regular English plurals (no -o, -f or irregular forms), for the plural skill.
NOUNS: tuple[str, ...] = (
    "cat", "dog", "cup", "bag", "hat", "pen", "car", "tree", "bird", "book", "door", "lamp",
    "ring", "ship", "coin", "desk", "rock", "road", "shoe", "sock", "star", "wall", "box",
    "fox", "bus", "dish", "brush", "church", "glass", "class", "city", "party", "baby",
    "story", "berry", "lady", "cherry", "puppy", "penny", "day", "toy", "boy", "key",
    "tray", "bench", "match", "peach", "wish", "kiss", "dress", "cloud", "river", "lake",
    "hill", "farm", "horse", "cow", "goat", "duck", "frog", "worm", "bell", "drum", "kite",
    "boat", "plate", "bowl", "fork", "table", "house", "room", "window", "garden", "flower",
    "candle", "mirror", "pillow", "blanket", "bottle", "basket", "pencil", "ruler", "eraser",
    "family", "country", "body", "lily", "army", "pony", "fly", "spy", "sky", "tax", "wax",
    "inch", "bush", "crash", "bunch", "lunch", "beach", "coach",
)  # fmt: skip

ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("old", "new"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("long", "short"), ("hard", "soft"),
    ("high", "low"), ("rich", "poor"), ("full", "empty"), ("wet", "dry"), ("strong", "weak"),
    ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("near", "far"),
    ("heavy", "light"), ("dark", "bright"), ("true", "false"), ("win", "lose"),
    ("push", "pull"), ("buy", "sell"), ("give", "take"), ("love", "hate"), ("first", "last"),
    ("inside", "outside"), ("left", "right"), ("north", "south"), ("east", "west"),
    ("day", "night"), ("black", "white"), ("sweet", "sour"), ("cheap", "expensive"),
    ("wide", "narrow"), ("deep", "shallow"), ("before", "after"), ("above", "below"),
    ("always", "never"), ("begin", "end"), ("friend", "enemy"), ("smooth", "rough"),
)  # fmt: skip

COLORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "gray", "gold",
)  # fmt: skip

NAMES: tuple[str, ...] = (
    "anna", "ben", "carla", "dev", "ella", "finn", "gia", "hugo", "ines", "jon", "kira", "leo",
    "mia", "nico", "olga", "paul", "rosa", "sam", "tara", "ugo", "vera", "will", "yara", "zoe",
)  # fmt: skip

PETS: tuple[str, ...] = ("dog", "cat", "fish", "bird", "horse", "rabbit", "turtle", "hamster")

JOBS: tuple[str, ...] = (
    "teacher", "doctor", "pilot", "farmer", "nurse", "chef", "artist", "driver", "baker",
    "writer", "lawyer", "plumber",
)  # fmt: skip

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)  # fmt: skip

LETTERS: str = string.ascii_lowercase

# Arithmetic operands stay in [0, MAX_OPERAND]; the suite uses the same range. Kept small so
# that every sum and difference occurs often enough in pretraining for a tiny model to know it.
MAX_OPERAND: int = 20


def plural(noun: str) -> str:
    """The regular English plural of ``noun`` (the rule NOUNS was chosen to follow)."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _make_places(seed: int = 1729, n: int = 48) -> dict[str, str]:
    """A fixed table of invented countries and their capitals.

    Invented names keep the lookup a fact the model can only have learned from this corpus,
    never from prior knowledge, and keep the table reproducible without shipping a data file.
    """
    rng = random.Random(seed)
    onsets = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr")
    vowels = ("a", "e", "i", "o", "u")
    codas = ("", "", "n", "r", "s", "l")

    def word(syllables: int) -> str:
        return "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables)
        ).capitalize()

    table: dict[str, str] = {}
    used: set[str] = set()
    while len(table) < n:
        country, capital = word(rng.choice((2, 3))), word(2)
        if country in used or capital in used or country == capital:
            continue
        used.update((country, capital))
        table[country] = capital
    return table


COUNTRY_CAPITALS: dict[str, str] = _make_places()

ALL_TOPIC_WORDS: tuple[str, ...] = tuple(w for words in TOPIC_WORDS.values() for w in words)

# Short lowercase words for spelling skills (reverse, uppercase, first/last letter, sorting).
SPELLING_WORDS: tuple[str, ...] = tuple(
    sorted({w for w in NOUNS + ALL_TOPIC_WORDS + COLORS + PETS if 3 <= len(w) <= 6})
)

# --------------------------------------------------------------------------------------------
# Document generators: one kind of text each, in the corpus's own templates
# --------------------------------------------------------------------------------------------

Generator = Callable[[random.Random], str]


def _sentence(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _topic_doc(rng: random.Random) -> str:
    topic = rng.choice(sorted(TOPIC_WORDS))
    vocab = TOPIC_WORDS[topic]
    templates = (
        "the {a} and the {b} were ready before the {c}",
        "we talked about the {a} for an hour",
        "my friend likes the {a} more than the {b}",
        "there was a {a} near the {b} today",
        "she wrote a note about the {a} and the {b}",
        "everyone asked about the new {a}",
        "the {a}, the {b} and the {c} were on the list",
        "the story of the {a} began with a {b}",
    )
    lines = []
    for _ in range(rng.randint(2, 5)):
        a, b, c = rng.sample(vocab, 3)
        lines.append(_sentence(rng.choice(templates).format(a=a, b=b, c=c).split()))
    if rng.random() < 0.5:
        lines.append(f"This text is about {topic}.")
    return " ".join(lines)


def _review_doc(rng: random.Random) -> str:
    positive = rng.random() < 0.5
    adjectives = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    item = rng.choice(REVIEW_ITEMS)
    a, b = rng.sample(adjectives, 2)
    openings = (
        f"I bought this {item} last week.",
        f"We tried the {item} on a friday.",
        f"My review of the {item}.",
    )
    body = rng.choice(
        (
            f"It was {a} and {b}.",
            f"The {item} is {a}, really {b}.",
            f"Honestly {a}. Also quite {b}.",
        )
    )
    verdict = (
        rng.choice(("Five stars.", "I recommend it.", "Would buy again.", "A positive review."))
        if positive
        else rng.choice(("One star.", "Avoid it.", "Never again.", "A negative review."))
    )
    return f"{rng.choice(openings)} {body} {verdict}"


def _spelling_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        w = rng.choice(SPELLING_WORDS)
        lines.append(
            rng.choice(
                (
                    f"The word {w} is spelled {' '.join(w)}.",
                    f"The word {w} spelled backwards is {w[::-1]}.",
                    f"Written in capitals, {w} becomes {w.upper()}.",
                    f"The word {w} starts with {w[0]} and ends with {w[-1]}.",
                    f"Copy the word {w}: {w} {w}.",
                    f"{w.upper()} is loud, {w} is quiet.",
                )
            )
        )
    return " ".join(lines)


def _word_knowledge_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.random()
        if kind < 0.4:
            a, b = rng.choice(ANTONYMS)
            if rng.random() < 0.5:
                a, b = b, a
            lines.append(rng.choice((f"The opposite of {a} is {b}.", f"{a.capitalize()} is not {b}.")))
        elif kind < 0.75:
            n = rng.choice(NOUNS)
            lines.append(rng.choice((f"One {n}, two {plural(n)}.", f"Many {plural(n)} and a single {n}.")))
        else:
            words = rng.sample(SPELLING_WORDS, 3)
            lines.append(f"In alphabetical order: {', '.join(sorted(words))}.")
    return " ".join(lines)


def _letters_doc(rng: random.Random) -> str:
    if rng.random() < 0.5:
        start = rng.randrange(0, 20)
        return " ".join(LETTERS[start : start + rng.randint(4, 8)]) + "."
    i = rng.randrange(0, 25)
    return f"After {LETTERS[i]} comes {LETTERS[i + 1]}. Before {LETTERS[i + 1]} comes {LETTERS[i]}."


def _counting_doc(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        start = rng.randrange(0, 40)
        return " ".join(str(k) for k in range(start, start + rng.randint(4, 9)))
    if kind < 0.5:
        start = rng.randrange(0, 6)
        return " ".join(NUMBER_WORDS[start : start + rng.randint(3, 7)]) + "."
    words = rng.sample(ALL_TOPIC_WORDS + NOUNS, rng.randint(1, 9))
    return f"{' '.join(words)}: that is {len(words)} words."


def _arithmetic_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        hi, lo = max(a, b), min(a, b)
        kind = rng.random()
        if kind < 0.3:
            lines.append(rng.choice((f"{a} + {b} = {a + b}", f"{a} plus {b} is {a + b}.")))
        elif kind < 0.6:
            lines.append(rng.choice((f"{hi} - {lo} = {hi - lo}", f"{hi} minus {lo} is {hi - lo}.")))
        elif kind < 0.8:
            n = rng.randint(0, 999)
            lines.append(f"{n} is {'even' if n % 2 == 0 else 'odd'}.")
        elif a != b:
            lines.append(rng.choice((f"{hi} is larger than {lo}.", f"Between {a} and {b}, {hi} is larger.")))
    return "\n".join(lines)


def _random_record(rng: random.Random) -> dict[str, str]:
    return {
        "name": rng.choice(NAMES),
        "age": str(rng.randint(18, 90)),
        "city": rng.choice(sorted(COUNTRY_CAPITALS.values())),
        "color": rng.choice(COLORS),
        "pet": rng.choice(PETS),
        "job": rng.choice(JOBS),
    }


def _record_doc(rng: random.Random) -> str:
    """A record in one of three layouts, mostly followed by questions answered from it, so the
    model practises reading a value back out of its context."""
    record = _random_record(rng)
    keys = rng.sample(sorted(record), rng.randint(2, 5))
    as_json = "{" + ", ".join(f'"{k}": "{record[k]}"' for k in keys) + "}"
    layout = rng.random()
    if layout < 0.5:
        lines = [f"{k}: {record[k]}" for k in keys]
    elif layout < 0.75:
        lines = [", ".join(f"{k}={record[k]}" for k in keys)]
        if rng.random() < 0.5:
            lines.append(f"As JSON: {as_json}")
    else:
        lines = [as_json]
    for k in rng.sample(keys, rng.randint(0, 2)):
        lines.append(
            rng.choice((f"The {k} in this record is {record[k]}.", f"Q: What is the {k}? A: {record[k]}."))
        )
    return "\n".join(lines)


def _list_doc(rng: random.Random) -> str:
    title = rng.choice(("Shopping list", "Things to pack", "To do", "Guests"))
    pool = {
        "Shopping list": TOPIC_WORDS["food"],
        "Things to pack": TOPIC_WORDS["travel"],
        "To do": NOUNS,
        "Guests": NAMES,
    }[title]
    items = rng.sample(pool, rng.randint(2, 5))
    if rng.random() < 0.5:
        return f"{title}: {', '.join(items)}."
    return title + ":\n" + "\n".join(f"- {item}" for item in items)


def _qa_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        kind = rng.random()
        if kind < 0.35:
            country = rng.choice(sorted(COUNTRY_CAPITALS))
            lines.append(f"Q: What is the capital of {country}? A: {COUNTRY_CAPITALS[country]}.")
        elif kind < 0.5:
            a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
            lines.append(f"Q: What is {a} plus {b}? A: {a + b}.")
        elif kind < 0.65:
            topic = rng.choice(sorted(TOPIC_WORDS))
            w = rng.choice(TOPIC_WORDS[topic])
            lines.append(f"Q: Which topic does {w} belong to? A: {topic}.")
        elif kind < 0.8:
            word, opposite = rng.choice(ANTONYMS)
            lines.append(f"Q: What is the opposite of {word}? A: {opposite}.")
        else:
            w = rng.choice(SPELLING_WORDS)
            lines.append(f"Q: How many letters are in {w}? A: {len(w)}.")
    return "\n".join(lines)


def _facts_doc(rng: random.Random) -> str:
    countries = rng.sample(sorted(COUNTRY_CAPITALS), rng.randint(2, 4))
    templates = (
        "{cap} is the capital of {c}.",
        "The capital city of {c} is {cap}.",
        "People in {c} travel to {cap} for work.",
    )
    return " ".join(rng.choice(templates).format(c=c, cap=COUNTRY_CAPITALS[c]) for c in countries)


# (kind name, relative weight, generator)
DOC_KINDS: tuple[tuple[str, float, Generator], ...] = (
    ("topic", 2.0, _topic_doc),
    ("review", 1.5, _review_doc),
    ("spelling", 2.5, _spelling_doc),
    ("word_knowledge", 2.0, _word_knowledge_doc),
    ("letters", 0.7, _letters_doc),
    ("counting", 1.0, _counting_doc),
    ("arithmetic", 3.0, _arithmetic_doc),
    ("record", 2.5, _record_doc),
    ("list", 0.6, _list_doc),
    ("qa", 1.5, _qa_doc),
    ("facts", 1.0, _facts_doc),
)


def iter_documents(seed: int) -> Iterator[str]:
    """An endless, reproducible stream of documents of mixed kinds, drawn by DOC_KINDS weight."""
    rng = random.Random(f"lamina-corpus:{seed}")
    generators = [g for _, _, g in DOC_KINDS]
    weights = [w for _, w, _ in DOC_KINDS]
    while True:
        yield rng.choices(generators, weights)[0](rng)


def generate_documents(seed: int, n: int) -> list[str]:
    """The first ``n`` documents of the stream for ``seed`` (same seed, same list)."""
    stream = iter_documents(seed)
    return [next(stream) for _ in range(n)]
