"""Ordinary chat requests, templated: the general side of routing a task's prompts.

A task's prompts often share a frame ("What is the name of Ben's dog?"), and the routing signal
(the prompt's mean token embedding, :mod:`adapters_store.routing`) is dominated by it: calibrated
only against text the base model samples from its BOS token, which never looks like a question,
a pets task's threshold let "What is the capital of France?" through (SmolLM2-135M-Instruct), and
``continual`` answered it with the task's model. These are what users also ask, in the frames
users ask it in, so the threshold learns that a frame alone is not the task.

Two disjoint halves: :func:`calibration_requests` for the thresholds and :func:`held_out_requests`
for measuring how often the router sends a general request to a task (``bench/routes``), so the
measurement never scores the requests the thresholds were fitted on.
"""

from __future__ import annotations

from itertools import cycle, islice

_FRAMES: dict[str, list[str]] = {
    "What is the {} ?": [
        "capital of Spain", "population of Tokyo", "speed of light", "largest ocean on Earth",
        "boiling point of water", "tallest building in the world", "currency of Japan",
        "main ingredient of guacamole", "longest river in Europe", "smallest prime number",
        "chemical symbol for gold", "capital of Canada", "freezing point of water in Fahrenheit",
        "distance from the Earth to the Moon",
    ],
    "What is the name of {} ?": [
        "the first man on the Moon", "the largest desert in Asia", "the president of Brazil",
        "the author of Don Quixote", "the ship that sank in 1912", "the planet closest to the Sun",
        "the bone in the upper arm", "the longest river in Africa", "a baby kangaroo",
        "the sea between Italy and Greece", "the galaxy we live in", "the tallest mountain in Japan",
    ],
    "Who {} ?": [
        "wrote Hamlet", "painted the Mona Lisa", "invented the telephone", "discovered penicillin",
        "composed the Four Seasons", "was the first woman to win a Nobel Prize", "built the pyramids",
        "wrote War and Peace", "founded the Roman Empire", "developed the theory of relativity",
    ],
    "How do I {} ?": [
        "boil an egg", "change a flat tire", "learn to swim", "write a cover letter", "bake bread",
        "tie a tie", "plant tomatoes", "reset my password", "make a paper plane", "improve my sleep",
    ],
    "Can you explain {} ?": [
        "photosynthesis", "how vaccines work", "the water cycle", "inflation", "black holes",
        "how a bill becomes a law", "compound interest", "why the sky is blue", "machine learning",
        "the French Revolution",
    ],
    "Write a short {} .": [
        "poem about the sea", "story about a dragon", "thank-you note to a teacher",
        "description of autumn", "joke about computers", "song about friendship",
        "letter to a pen pal", "review of a restaurant", "speech for a wedding", "haiku about snow",
    ],
    "Translate '{} .": [
        "hello' into Spanish", "thank you' into French", "good morning' into German",
        "goodbye' into Italian", "cat' into Japanese", "water' into Portuguese",
        "I love you' into Dutch", "where is the station' into Russian",
    ],
    "What is {} ?": [
        "2 plus 3", "12 times 7", "the square root of 81", "100 divided by 4", "15 minus 9",
        "half of 64", "ten percent of 250", "3 to the power of 4",
    ],
    "Tell me {} .": [
        "a joke", "a fun fact about octopuses", "about the history of tea", "something about Mars",
        "a riddle", "about the Great Wall of China", "how rainbows form", "a bedtime story",
    ],
    "Give me {} .": [
        "three tips for studying", "a recipe for pancakes", "five names for a dog",
        "a workout for beginners", "ideas for a birthday party", "a list of fruits high in vitamin C",
        "two synonyms for happy", "a packing list for camping",
    ],
    "{}": [
        "Hello, how are you?", "Good morning!", "Thanks for your help.", "Are you a robot?",
        "I feel tired today.", "Recommend a good book.", "Is it going to rain tomorrow?",
        "Summarize the plot of Romeo and Juliet.", "Why do cats purr?", "Describe a sunset.",
    ],
}  # fmt: skip


def _requests(half: int) -> list[str]:
    """Every other filler of each frame, starting at ``half`` (0 or 1)."""
    out = []
    for frame, fillers in _FRAMES.items():
        for filler in islice(cycle(fillers), half, len(fillers), 2):
            text = frame.replace("{}", filler).replace(" ?", "?").replace(" .", ".")
            out.append(text)
    return out


def calibration_requests() -> list[str]:
    """The half the routing thresholds are calibrated against."""
    return _requests(0)


def held_out_requests() -> list[str]:
    """The other half: for measuring general requests routed to a task, never fitted on."""
    return _requests(1)
