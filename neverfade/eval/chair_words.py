"""CHAIR's object vocabulary: the 80 COCO categories, their synonyms, two-word phrases, and how words are normalised.

The synonym table is the original's `data/synonyms.txt` (Rohrbach et al. 2018): each line is a category followed by
its synonyms. Two whitespace slips of the original are fixed (" motor bike" and " cheesecake" carried a leading
space there and could never match) and "iPhone" is lowercased like every caption word.

Lemmatisation: a vocabulary-restricted singulariser, no dependency and nothing downloaded. Only words that are in
the vocabulary (synonyms and the words of two-word phrases) can change a CHAIR result, so instead of a general
lemmatiser (the original used pattern's `singularize`, which no longer installs; forks use WordNet, whose data is a
download) every vocabulary word's plural forms are generated here by English rules plus an irregular table
(people, children, mice, knives, policemen, ...), and a caption token that is not itself a vocabulary word is mapped
back through that table. Other words are left untouched, so nothing outside the vocabulary can turn into an object by
accident, and pattern's quirks (glass -> glas) do not arise.
"""

from __future__ import annotations

import re
from functools import cached_property

SYNONYMS = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter, motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake, cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iphone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""

# Two-word phrases read as one word (the original's list; "dining table" added, which changes no result because
# "dining" alone is no object). Phrases that are not objects ("home plate", "train track") stop their words firing.
PHRASES = [
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
    "dining table",
]
# "baby elephant" is an elephant, not a person plus an elephant; "passenger train" is a train, not a person.
ANIMAL_WORDS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"]
VEHICLE_WORDS = ["jet", "train"]
RENAMED_PHRASES = {"bow tie": "tie", "toilet seat": "toilet"}

# Plurals that English rules do not produce.
IRREGULAR_PLURALS = {
    "person": ["people", "persons"],
    "child": ["children"],
    "mouse": ["mice"],
    "goose": ["geese"],
    "ox": ["oxen"],
    "knife": ["knives"],
    "calf": ["calves"],
    "bus": ["buses", "busses"],
    "grandchild": ["grandchildren"],
    "pocketknife": ["pocketknives"],
    "thief": ["thieves"],
}
SAME_IN_PLURAL = {"sheep", "bison", "buffalo", "aircraft", "fowl", "waterfowl", "quail", "cattle", "skis", "scissors"}

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|[^\sa-z0-9]")


def plurals(word: str) -> list[str]:
    """English plural forms of one word (the last word of a phrase is the one inflected)."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    forms = [word] if word in SAME_IN_PLURAL else []
    if word.endswith("man"):
        return forms + [word[:-3] + "men"]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return forms + [word + "es"]
    if re.search(r"[^aeiou]y$", word):
        return forms + [word[:-1] + "ies"]
    if word.endswith("o"):
        return forms + [word + "s", word + "es"]
    return forms + [word + "s"]


def tokenize(text: str) -> list[str]:
    """Lowercased words (hyphenated compounds stay one word, like NLTK's tokenizer) and punctuation marks."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Finds COCO objects in text: `objects(text)` -> [(word as written, after normalisation; category)]."""

    def __init__(self) -> None:
        self.category_of: dict[str, str] = {}
        for line in SYNONYMS.splitlines():
            names = [name.strip() for name in line.split(",")]
            for name in names:
                self.category_of[name] = names[0]
        self.phrase_of: dict[tuple[str, str], str] = {tuple(p.split()): p for p in PHRASES}
        for word in ANIMAL_WORDS:
            self.phrase_of["baby", word] = self.phrase_of["adult", word] = word
        for word in VEHICLE_WORDS:
            self.phrase_of["passenger", word] = word
        for phrase, word in RENAMED_PHRASES.items():
            self.phrase_of[tuple(phrase.split())] = word

    @cached_property
    def singular_of(self) -> dict[str, str]:
        """Plural form -> vocabulary word, for every word that can take part in a match."""
        words = {w for name in self.category_of for w in name.split()}
        words |= {w for pair in self.phrase_of for w in pair}
        table = {}
        for word in sorted(words):
            for plural in plurals(word):
                if plural not in words:
                    table.setdefault(plural, word)
        return table

    def normalise(self, tokens: list[str]) -> list[str]:
        return [self.singular_of.get(t, t) for t in tokens]

    def objects(self, text: str) -> list[tuple[str, str]]:
        words = self.normalise(tokenize(text))
        merged, i = [], 0
        while i < len(words):
            phrase = self.phrase_of.get(tuple(words[i : i + 2]))
            if phrase is not None:
                merged.append(phrase)
                i += 2
            else:
                merged.append(words[i])
                i += 1
        if "toilet" in merged and "seat" in merged:  # "the seat of the toilet" is no chair (the original's rule)
            merged = [w for w in merged if w != "seat"]
        return [(w, self.category_of[w]) for w in merged if w in self.category_of]


def count_words(text: str) -> int:
    """Caption length: whitespace-separated words holding a letter or digit ("dog's" is one, a lone "-" none)."""
    return sum(1 for chunk in text.split() if any(c.isalnum() for c in chunk))


CATEGORIES = list(dict.fromkeys(line.split(",")[0].strip() for line in SYNONYMS.splitlines()))
assert len(CATEGORIES) == 80
