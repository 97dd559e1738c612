"""Demo data: a team's table of teacher (Qwen-7B-style) event extractions from SEC sentences.

Deterministic by seed. It looks like the real thing: mostly boilerplate that the
teacher answered {"skip": true}, exact and near duplicates, low-confidence rows,
malformed teacher JSON, NULL and empty inputs, two prompt versions, and rows
spread over several weeks so incremental exports mean something.

`generate_rows` yields `DemoRow`s; each carries the clean answer for its
sentence (`answer`), which the demo teacher server answers from.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Iterator

START = datetime(2026, 9, 1, tzinfo=timezone.utc)
SPREAD_DAYS = 42

_FIRST = ["Apex", "Birch", "Cobalt", "Dover", "Everest", "Fulton", "Granite", "Harbor", "Ironwood", "Juniper",
          "Keystone", "Lakeshore", "Meridian", "Northgate", "Oakridge", "Pinnacle", "Quarry", "Redwood",
          "Summit", "Tidewater", "Union", "Vantage", "Westfield", "Yellowstone", "Zenith", "Atlas", "Beacon",
          "Crescent", "Delta", "Ember", "Falcon", "Glacier", "Horizon", "Insight", "Jetstream", "Kestrel"]
_SECOND = ["Holdings", "Therapeutics", "Energy", "Financial", "Technologies", "Industries", "Bancorp",
           "Pharmaceuticals", "Logistics", "Semiconductor", "Retail Group", "Software", "Capital", "Minerals",
           "Biosciences", "Networks", "Foods", "Aerospace", "Health", "Realty"]
_SUFFIX = ["Inc.", "Corp.", "Ltd.", "LLC", "plc", "Co."]
_AUDITORS = ["PricewaterhouseCoopers LLP", "KPMG LLP", "Ernst & Young LLP", "Deloitte & Touche LLP",
             "Grant Thornton LLP", "BDO USA, P.C.", "RSM US LLP", "Moss Adams LLP"]
_PEOPLE = ["Jane Alvarez", "Robert Chen", "Maria Okafor", "David Lindqvist", "Priya Raman", "Thomas Becker",
           "Laura Whitfield", "Ahmed Haddad", "Sofia Marini", "Kenji Watanabe", "Grace Murphy", "Daniel Novak"]
_ROLES = ["Chief Executive Officer", "Chief Financial Officer", "Chief Operating Officer", "General Counsel",
          "Chief Accounting Officer", "President"]
_UNITS = ["its specialty chemicals business", "the North American retail segment", "its consumer lending unit",
          "the industrial coatings division", "its European distribution operations", "the generic drugs unit"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]

# Boilerplate: forward-looking language, risk factors, definitions, safe harbor.
_BOILERPLATE = [
    "This {doc} of {company} contains forward-looking statements within the meaning of the Private Securities "
    "Litigation Reform Act of 1995, including statements regarding {topic}.",
    "{company}'s results of operations may fluctuate significantly from {period} to {period} due to {factor}.",
    "As used in this {doc}, the terms \"we,\" \"us\" and \"our\" refer to {company} and its {count} "
    "consolidated subsidiaries.",
    "{company} may be adversely affected by {factor}, which could harm its business and {topic}.",
    "The following discussion of {topic} should be read in conjunction with Note {note} to the consolidated "
    "financial statements of {company} included in this {doc}.",
    "There can be no assurance that {factor} will not have a material adverse effect on {topic} at {company}.",
    "Words such as \"anticipate,\" \"believe,\" \"expect\" and \"intend\" identify forward-looking "
    "statements by {company} about {topic}.",
    "{company} is subject to extensive regulation in {count} jurisdictions, and {factor} could increase its costs.",
    "See page {page} of this {doc} for the index to the consolidated financial statements of {company} for the "
    "{period} ended December 31, {year}.",
    "Investors should read the risk factors in Item 1A of the {doc} of {company}, including those on {factor}.",
]
_DOCS = ["Annual Report on Form 10-K", "Quarterly Report on Form 10-Q", "Current Report on Form 8-K",
         "registration statement", "proxy statement"]
_TOPICS = ["our future financial performance", "our liquidity and capital resources", "anticipated market trends",
           "the expected timing of product launches", "our ability to integrate acquired businesses",
           "our dividend policy", "pending regulatory approvals", "our cost reduction initiatives"]
_FACTORS = ["changes in interest rates", "supply chain disruptions", "cybersecurity incidents",
            "fluctuations in foreign currency exchange rates", "the loss of key personnel",
            "adverse weather conditions", "increased competition", "changes in tax laws",
            "the outcome of pending litigation", "inflationary pressures"]
_CLAUSES = [", except as required by applicable law", ", as amended", " for the periods presented",
            ", which are incorporated herein by reference", " and should not be relied upon unduly",
            ", as further described under Management's Discussion and Analysis", " in all material respects",
            ", subject to the limitations described below", " as of the date of this report"]
_PERIODS = ["quarter", "year", "fiscal quarter", "fiscal year"]


@dataclass(frozen=True)
class DemoRow:
    sentence: str | None
    teacher_output: str | None
    confidence: float | None
    prompt_version: str
    created_at: datetime
    kind: str  # event | skip | exact_dup | near_dup | low_conf | malformed | null_input | empty_input
    answer: dict  # what a perfect teacher answers for this sentence
    # exact_dup / near_dup rows: the earlier sentence this one was copied or edited from
    # (kept when the kind is later overwritten, e.g. malformed); ground truth for dedup benchmarks
    source_sentence: str | None = None


def _company(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_SECOND)} {rng.choice(_SUFFIX)}"


def _day(rng: random.Random) -> tuple[str, str]:
    d = date(rng.choice([2025, 2026]), rng.randint(1, 12), rng.randint(1, 28))
    return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}", d.isoformat()


def _money(rng: random.Random) -> tuple[str, str]:
    amount = rng.choice([5, 12, 25, 40, 75, 120, 250, 400, 600, 850, 1200, 2500])
    unit = "billion" if amount >= 1000 else "million"
    shown = amount / 1000 if amount >= 1000 else amount
    magnitude = "major" if amount >= 400 else "moderate" if amount >= 40 else "minor"
    return f"${shown:g} {unit}", magnitude


def _event(rng: random.Random) -> tuple[str, dict]:
    company = _company(rng)
    when, iso = _day(rng)
    kind = rng.randrange(12)
    ev = {"event_type": None, "subject": company, "object": None, "magnitude_class": "moderate",
          "timing": "definitive", "sentiment": "neutral", "materiality": "material", "event_date": iso}
    if kind == 0:
        target, (money, mag) = _company(rng), _money(rng)
        text = f"On {when}, {company} completed the acquisition of {target} for approximately {money} in cash."
        ev.update(event_type="acquisition", object=target, magnitude_class=mag, timing="completed",
                  sentiment="positive")
    elif kind == 1:
        unit, (money, mag) = rng.choice(_UNITS), _money(rng)
        text = f"{company} agreed on {when} to sell {unit} to a private equity buyer for {money}."
        ev.update(event_type="divestiture", object=unit, magnitude_class=mag, timing="planned")
    elif kind == 2:
        auditor = rng.choice(_AUDITORS)
        text = (f"{company} dismissed {auditor} as its independent registered public accounting firm "
                f"on {when}, following a disagreement on revenue recognition.")
        ev.update(event_type="dismissed_auditor", object=auditor, magnitude_class="major", sentiment="negative")
    elif kind == 3:
        person, role = rng.choice(_PEOPLE), rng.choice(_ROLES)
        text = f"{person} resigned as {role} of {company}, effective {when}, to pursue other opportunities."
        ev.update(event_type="executive_departure", object=person, sentiment="negative")
    elif kind == 4:
        person, role = rng.choice(_PEOPLE), rng.choice(_ROLES)
        text = f"The Board of {company} appointed {person} as {role}, effective {when}."
        ev.update(event_type="executive_appointment", object=person, magnitude_class="minor",
                  materiality="not_material")
    elif kind == 5:
        money, mag = _money(rng)
        rate = rng.choice(["4.25%", "5.50%", "6.875%", "7.125%", "8.00%"])
        text = f"On {when}, {company} issued {money} aggregate principal amount of {rate} senior notes due 2031."
        ev.update(event_type="debt_issuance", object=f"{rate} senior notes", magnitude_class=mag)
    elif kind == 6:
        money, mag = _money(rng)
        text = f"{company}'s board authorized a share repurchase program of up to {money} on {when}."
        ev.update(event_type="share_repurchase", magnitude_class=mag, timing="planned", sentiment="positive")
    elif kind == 7:
        pct = rng.choice([5, 8, 10, 12, 15, 20, 25])
        up = rng.random() < 0.6
        text = (f"On {when}, {company} {'raised' if up else 'cut'} its quarterly dividend by {pct}% "
                f"to ${rng.randint(10, 95) / 100:.2f} per share.")
        ev.update(event_type="dividend_change", magnitude_class="minor" if pct < 10 else "moderate",
                  sentiment="positive" if up else "negative")
    elif kind == 8:
        up = rng.random() < 0.5
        text = (f"{company} {'raised' if up else 'lowered'} its full-year revenue guidance on {when}, "
                f"citing {'strong demand' if up else 'weaker orders'} in {rng.choice(_UNITS)}.")
        ev.update(event_type="guidance_change", sentiment="positive" if up else "negative")
    elif kind == 9:
        plaintiff = _company(rng)
        money, mag = _money(rng)
        text = (f"On {when}, {plaintiff} filed a complaint against {company} seeking damages of {money} "
                f"for alleged patent infringement.")
        ev.update(event_type="litigation", subject=plaintiff, object=company, magnitude_class=mag,
                  sentiment="negative")
    elif kind == 10:
        quarters = rng.choice(["the first three quarters", "fiscal years 2023 and 2024", "the second quarter"])
        text = (f"On {when}, the audit committee of {company} concluded that its financial statements for "
                f"{quarters} should no longer be relied upon and will be restated.")
        ev.update(event_type="restatement", object=quarters, magnitude_class="major", sentiment="negative")
    else:
        heads = rng.choice([120, 300, 450, 800, 1500, 2200])
        text = f"{company} announced on {when} a reduction of approximately {heads} positions, or {rng.randint(3, 15)}% of its workforce."
        ev.update(event_type="layoffs", magnitude_class="major" if heads >= 800 else "moderate",
                  sentiment="negative")
    return text, ev


def _boilerplate(rng: random.Random) -> str:
    template = rng.choice(_BOILERPLATE)
    text = template.format(doc=rng.choice(_DOCS), topic=rng.choice(_TOPICS), factor=rng.choice(_FACTORS),
                           period=rng.choice(_PERIODS), company=_company(rng), year=rng.choice([2024, 2025]),
                           count=rng.randint(2, 60), note=rng.randint(2, 24), page=rng.randint(40, 190))
    return text[:-1] + rng.choice(_CLAUSES) + "." if rng.random() < 0.5 else text


def _near_edit(rng: random.Random, text: str) -> str:
    """Whitespace, punctuation or number edits that keep the sentence a near duplicate."""
    edit = rng.randrange(3)
    if edit == 0:
        return text.replace(" ", "  ", 2).rstrip(".") + " ."
    if edit == 1:
        return text.replace(",", "", 1).replace(".", ";", 1) if "," in text else text + "!"
    digits = [i for i, ch in enumerate(text) if ch.isdigit()]
    if not digits:
        return "  " + text.replace(" the ", " the  ", 1)
    i = rng.choice(digits)
    return text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]


def _dump(answer: dict) -> str:
    return json.dumps(answer, ensure_ascii=False)


def generate_rows(n: int = 5000, seed: int = 7, prompt_versions: tuple[str, str] = ("v1", "v2"),
                  second_version_share: float = 0.2, spread_days: float = SPREAD_DAYS) -> Iterator[DemoRow]:
    """Yield `n` demo rows in created_at order.

    The last `second_version_share` of the timeline was labelled under the second
    prompt version (the team edited its prompt), the rest under the first.
    """
    rng = random.Random(seed)
    history: list[tuple[str, dict]] = []  # earlier clean (sentence, answer) pairs, for duplicates
    step = spread_days * 86400 / max(n, 1)
    switch = int(n * (1 - second_version_share))
    for i in range(n):
        created = START + timedelta(seconds=i * step + rng.random() * step)
        version = prompt_versions[0] if i < switch else prompt_versions[1]
        confidence = float(rng.choice([8, 9, 9, 10, 10, 10]))
        roll = rng.random()
        kind = "event"
        source = None
        if roll < 0.005:
            yield DemoRow(None, _dump({"skip": True}), confidence, version, created, "null_input", {"skip": True})
            continue
        if roll < 0.01:
            yield DemoRow(rng.choice(["", "   ", "\n"]), _dump({"skip": True}), confidence, version, created,
                          "empty_input", {"skip": True})
            continue
        if roll < 0.06 and history:
            sentence, answer = rng.choice(history)
            kind, source = "exact_dup", sentence
        elif roll < 0.11 and history:
            base, answer = rng.choice(history)
            sentence = _near_edit(rng, base)
            kind, source = "near_dup", base
        elif rng.random() < 0.6:
            sentence, answer = _boilerplate(rng), {"skip": True}
            kind = "skip"
        else:
            sentence, answer = _event(rng)
        if kind in ("event", "skip"):
            history.append((sentence, answer))
            if len(history) > 5000:  # bounded memory at 10M rows; duplicates stay local in time
                history.pop(rng.randrange(len(history)))
        output = _dump(answer)
        second = rng.random()
        if second < 0.05:
            confidence = float(rng.randint(2, 6))
            kind = "low_conf" if kind == "event" else kind
        elif second < 0.06:
            output = output[: rng.randint(3, max(4, len(output) - 2))]  # truncated generation
            kind = "malformed"
        yield DemoRow(sentence, output, confidence, version, created, kind, answer, source)


def clean_examples(n: int, seed: int = 7) -> Iterator[tuple[int, DemoRow]]:
    """The first `n` distinct clean rows (events and skips) with their row index: ready-made training pairs."""
    seen: set[str] = set()
    for i, row in enumerate(generate_rows(n * 4, seed=seed)):
        if row.kind not in ("event", "skip") or row.sentence in seen:
            continue
        seen.add(row.sentence)
        yield i, row
        if len(seen) == n:
            return


def source_table(rows: list[DemoRow], first_id: int = 1):
    """The rows as source_rows exports them (id, input, output, confidence, prompt_version, created_at)."""
    import pyarrow as pa  # only the callers that build tables pay for it

    return pa.table({
        "id": pa.array(range(first_id, first_id + len(rows)), pa.int64()),
        "input": pa.array([r.sentence for r in rows], pa.string()),
        "output": pa.array([r.teacher_output for r in rows], pa.string()),
        "confidence": pa.array([r.confidence for r in rows], pa.float64()),
        "prompt_version": pa.array([r.prompt_version for r in rows], pa.string()),
        "created_at": pa.array([r.created_at for r in rows], pa.timestamp("us", tz="UTC")),
    })
