"""Make train.txt / dev.txt (CoNLL format) from the shipped WikiText-2 excerpt, by rule.

    python data/ner/make_ner.py        # from the repository root; rewrites both files

Silver labels, not human ones: every tag follows from the rules below, so the data can be
redistributed under WikiText's licence (CC BY-SA 3.0) and remade by anyone. Three types:
  DATE  a year (1000-2099), with a month name and day before it where present
  NUM   any other number; WikiText writes 1,200 and 0.7 as "1 @,@ 200" and "0 @.@ 7"
  NAME  a run of capitalised words (Homarus, British Isles, H.), except one lone capitalised
        word opening a sentence
Headings (= ... =) are left out; sentences end at . ! ? ; the first 20 articles are train,
the last 5 dev.
"""

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "wikitext", "wiki.valid.excerpt.tokens")
MONTHS = {"January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"}
NUMBER, JOIN = re.compile(r"^\d+$"), {"@,@", "@.@"}
CAPITALISED = re.compile(r"^([A-Z][a-z]+|[A-Z]\.|[A-Z][a-z]*[A-Z][a-z]*)$")


def is_year(word):
    return NUMBER.match(word) is not None and 1000 <= int(word) <= 2099


def tag_sentence(words):
    tags = ["O"] * len(words)
    i = 0
    while i < len(words):
        j = i
        if words[i] in MONTHS or is_year(words[i]):  # [Month [day]] year, or Month day, or a year
            j = i + 1
            if words[i] in MONTHS and j < len(words) and NUMBER.match(words[j]) and not is_year(words[j]):
                j += 1
            if words[i] in MONTHS and j < len(words) and is_year(words[j]):
                j += 1
            kind = "DATE" if j - i > 1 or is_year(words[i]) else None
        elif NUMBER.match(words[i]):
            j = i + 1
            while j + 1 < len(words) and words[j] in JOIN and NUMBER.match(words[j + 1]):
                j += 2
            kind = "NUM"
        elif CAPITALISED.match(words[i]):
            while j < len(words) and CAPITALISED.match(words[j]) and words[j] not in MONTHS:
                j += 1
            kind = "NAME" if j - i > 1 or i > 0 else None
        else:
            j, kind = i + 1, None
        if kind:
            tags[i:j] = [f"B-{kind}"] + [f"I-{kind}"] * (j - i - 1)
        i = max(j, i + 1)
    return tags


def sentences(lines):
    for line in lines:
        words = line.split()
        if not words or words[0] == "=":
            continue
        sentence = []
        for word in words:
            sentence.append(word)
            if word in (".", "!", "?"):
                yield sentence
                sentence = []
        if sentence:
            yield sentence


def main():
    with open(SOURCE, encoding="utf-8") as f:
        text = f.read()
    # articles begin with a level-1 heading " = Title = " (level 2 is " = = ... = = ")
    articles = re.split(r"\n \n (?== [^=])", text)
    articles = [a for a in articles if a.strip()]
    for name, part in (("train.txt", articles[:20]), ("dev.txt", articles[20:])):
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            for article in part:
                for words in sentences(article.splitlines()):
                    f.writelines(f"{w} {t}\n" for w, t in zip(words, tag_sentence(words)))
                    f.write("\n")


if __name__ == "__main__":
    main()
