"""The standard VQA answer normalisation: the official VQA evaluation's (`vqaEval.py` of the VQA
API, as EvalAI runs it and lmms-eval's `EvalAIAnswerProcessor` repeats it), so a short answer
is compared the way every published VQAv2 / TextVQA number compares it.

Steps, on one answer: lower-case, drop `,` and `?`, `'s` -> ` 's`, newlines and tabs to spaces,
strip; punctuation (`;/[]"{}()=+\\_-><@`,?!`) removed where it touches a space or the text has
a digit-comma-digit, else replaced by a space; a full stop not followed by a digit removed (the
official regex `(?!<=\\d)(\\.)(?!\\d)` is a typo for a look-behind, and its `re.UNICODE` lands in
`sub`'s `count`, so at most 32 are removed: both kept, since the published numbers have them);
number words zero..ten -> digits, articles a/an/the dropped, the contractions below restored.
`tests/eval/test_vqa_normalize.py` checks this function against lmms-eval's on every table
entry and on generated text.
"""

from __future__ import annotations

import re

ARTICLES = frozenset({"a", "an", "the"})
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official call passes the flag where `count` goes
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(\,)+(?=\d)")

# "restored form: the forms written without (some of) its apostrophes", as the official table has
# them (with its oddities: `let's` and `she's` map to themselves, `somebody'd` to `somebodyd`)
_CONTRACTION_TABLE = """
ain't: aint
aren't: arent
can't: cant
could've: couldve
couldn't: couldnt
couldn't've: couldn'tve couldnt've
didn't: didnt
doesn't: doesnt
don't: dont
hadn't: hadnt
hadn't've: hadnt've hadn'tve
hasn't: hasnt
haven't: havent
he'd: hed
he'd've: hed've he'dve
he's: hes
how'd: howd
how'll: howll
how's: hows
I'd've: Id've I'dve
I'm: Im
I've: Ive
isn't: isnt
it'd: itd
it'd've: itd've it'dve
it'll: itll
let's: let's
ma'am: maam
mightn't: mightnt
mightn't've: mightnt've mightn'tve
might've: mightve
mustn't: mustnt
must've: mustve
needn't: neednt
not've: notve
o'clock: oclock
oughtn't: oughtnt
'ow's'at: ow's'at 'ows'at 'ow'sat
shan't: shant
she'd've: shed've she'dve
she's: she's
should've: shouldve
shouldn't: shouldnt
shouldn't've: shouldnt've shouldn'tve
somebodyd: somebody'd
somebody'd've: somebodyd've somebody'dve
somebody'll: somebodyll
somebody's: somebodys
someone'd: someoned
someone'd've: someoned've someone'dve
someone'll: someonell
someone's: someones
something'd: somethingd
something'd've: somethingd've something'dve
something'll: somethingll
that's: thats
there'd: thered
there'd've: thered've there'dve
there're: therere
there's: theres
they'd: theyd
they'd've: theyd've they'dve
they'll: theyll
they're: theyre
they've: theyve
'twas: twas
wasn't: wasnt
we'd've: wed've we'dve
we've: weve
weren't: werent
what'll: whatll
what're: whatre
what's: whats
what've: whatve
when's: whens
where'd: whered
where's: wheres
where've: whereve
who'd: whod
who'd've: whod've who'dve
who'll: wholl
who's: whos
who've: whove
why'll: whyll
why're: whyre
why's: whys
won't: wont
would've: wouldve
wouldn't: wouldnt
wouldn't've: wouldnt've wouldn'tve
y'all: yall
y'all'll: yall'll y'allll
y'all'd've: yall'd've y'alld've y'all'dve
you'd: youd
you'd've: youd've you'dve
you'll: youll
you're: youre
you've: youve
"""
CONTRACTIONS = {
    written: restored
    for line in _CONTRACTION_TABLE.strip().splitlines()
    for restored, writtens in [line.split(": ")]
    for written in writtens.split()
}


def _punctuation(text: str) -> str:
    out = text
    joined = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or joined:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _digits_and_articles(text: str) -> str:
    words = [NUMBERS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """One answer as the official VQA evaluation compares it (module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))
