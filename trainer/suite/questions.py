"""Templated questions with known answers, for the general-ability set (:mod:`trainer.suite.general`):
sums, capitals of well-known countries, opposites, and the probe's candidates. Only those the base
model answers right are kept there, so each is a fact the base knew before any task."""

from __future__ import annotations

from trainer.config import Example
from trainer.suite import probe

# Well-known countries whose capital's first word is unambiguous (no accents, no rival capitals).
_CAPITALS = {
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "the Czech Republic": "Prague",
    "Iceland": "Reykjavik", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Belarus": "Minsk",
    "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn", "Albania": "Tirana",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "Luxembourg": "Luxembourg", "Malta": "Valletta",
    "Cyprus": "Nicosia", "Armenia": "Yerevan", "Azerbaijan": "Baku", "Uzbekistan": "Tashkent",
    "Afghanistan": "Kabul", "Pakistan": "Islamabad", "India": "New", "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu", "Vietnam": "Hanoi", "Cambodia": "Phnom", "Laos": "Vientiane",
    "Malaysia": "Kuala", "Indonesia": "Jakarta", "the Philippines": "Manila", "South Korea": "Seoul",
    "North Korea": "Pyongyang", "Taiwan": "Taipei", "Saudi Arabia": "Riyadh", "Iraq": "Baghdad",
    "Syria": "Damascus", "Jordan": "Amman", "Lebanon": "Beirut", "Qatar": "Doha", "Oman": "Muscat",
    "the United Arab Emirates": "Abu", "Australia": "Canberra", "New Zealand": "Wellington",
    "Fiji": "Suva", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Jamaica": "Kingston", "Haiti": "Port-au-Prince", "Panama": "Panama", "Costa Rica": "San",
    "Guatemala": "Guatemala", "Honduras": "Tegucigalpa", "Nicaragua": "Managua",
    "the Dominican Republic": "Santo", "the Bahamas": "Nassau", "the United States": "Washington",
    "the United Kingdom": "London", "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli",
    "Sudan": "Khartoum", "Uganda": "Kampala", "Rwanda": "Kigali", "Senegal": "Dakar",
    "Zimbabwe": "Harare", "Zambia": "Lusaka", "Angola": "Luanda", "Mozambique": "Maputo",
    "Somalia": "Mogadishu", "Mali": "Bamako", "Niger": "Niamey", "Botswana": "Gaborone",
    "Namibia": "Windhoek", "Singapore": "Singapore", "Monaco": "Monaco", "Liechtenstein": "Vaduz",
    "Bosnia": "Sarajevo", "Montenegro": "Podgorica", "North Macedonia": "Skopje",
    "Kyrgyzstan": "Bishkek", "Tajikistan": "Dushanbe", "Bhutan": "Thimphu", "Barbados": "Bridgetown",
    "Papua New Guinea": "Port", "Samoa": "Apia", "Madagascar": "Antananarivo",
}  # fmt: skip
_OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("day", "night"),
    ("black", "white"), ("left", "right"), ("north", "south"), ("east", "west"), ("true", "false"),
    ("yes", "no"), ("win", "lose"), ("love", "hate"), ("rich", "poor"), ("wet", "dry"),
    ("top", "bottom"), ("front", "back"), ("inside", "outside"), ("push", "pull"), ("buy", "sell"),
    ("early", "late"), ("first", "last"), ("empty", "full"), ("thick", "thin"), ("wide", "narrow"),
    ("deep", "shallow"), ("strong", "weak"), ("loud", "quiet"), ("cheap", "expensive"),
    ("friend", "enemy"), ("war", "peace"), ("life", "death"), ("question", "answer"),
    ("above", "below"), ("before", "after"), ("male", "female"), ("positive", "negative"),
    ("always", "never"), ("everything", "nothing"), ("success", "failure"), ("increase", "decrease"),
    ("import", "export"), ("maximum", "minimum"), ("majority", "minority"), ("visible", "invisible"),
    ("possible", "impossible"), ("legal", "illegal"), ("accept", "reject"), ("remember", "forget"),
    ("summer", "winter"), ("odd", "even"), ("asleep", "awake"), ("boy", "girl"), ("man", "woman"),
    ("plus", "minus"), ("on", "off"), ("clean", "dirty"), ("sunrise", "sunset"),
]  # fmt: skip
_SUM_RANGE = range(21)  # "a + b =" for a, b in 0..20


def candidate_questions() -> list[Example]:
    """Every templated known-answer question, the probe's first, each prompt once.

    Templated so there are hundreds (a share over a dozen questions resolves nothing); the base
    decides which it knows in :func:`build_general_set`.
    """
    candidates = [
        *probe.CANDIDATES,
        *(Example(f"The capital of {country} is", f" {city}") for country, city in _CAPITALS.items()),
        *(Example(f"{a} + {b} =", f" {a + b}") for a in _SUM_RANGE for b in _SUM_RANGE),
        *(Example(f"The opposite of {word} is", f" {other}") for word, other in _OPPOSITES),
    ]
    seen: set[str] = set()
    unique = []
    for question in candidates:
        if question.prompt not in seen:
            seen.add(question.prompt)
            unique.append(question)
    return unique
