"""Writes the walk-through's JSONL files (README "Your own data"); the files are committed, this
script shows how they were made: `python examples/own_data/make_data.py`.

- convert.jsonl: unit conversions, answers are numbers (scored by the `numeric` scorer).
- weather.jsonl: requests to a weather API, answers are JSON calls (the `function_call` scorer);
  extra fields (`id`, `functions`) stay in each example's metadata.
Validation prompts never occur in train (held out by construction).
"""

import json
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).parent
UNITS = {("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000, ("h", "min"): 60, ("min", "s"): 60}
CITIES = ("paris", "tokyo", "lima", "oslo", "cairo", "delhi", "quito", "rome", "accra", "perth",
          "seoul", "dakar", "hanoi", "dublin", "bogota", "tunis")
DAYS = ("today", "tomorrow", "monday", "tuesday", "friday", "saturday")
PHRASES = ("weather in {city} {day}", "what is the weather in {city} {day}", "{city} weather {day}",
           "forecast for {city} {day}")
FUNCTIONS = [{"name": "get_weather", "parameters": {"city": "string", "day": "string",
                                                   "unit": "c | f (optional, default c)"}}]


def convert_rows():
  """Every (number, units) question once: 99 x 5."""
  return [{"question": f"{n} {a} in {b}?", "answer": str(n * factor)}
          for (a, b), factor in UNITS.items() for n in range(1, 100)]


def weather_rows():
  """Every (city, day, unit, phrasing) request once: 16 x 6 x 2 x 4."""
  rows = []
  for city in CITIES:
    for day in DAYS:
      for unit in ("c", "f"):
        args = {"city": city, "day": day} | ({"unit": "f"} if unit == "f" else {})
        for phrase in PHRASES:
          text = phrase.format(city=city, day=day) + (" in fahrenheit" if unit == "f" else "")
          rows.append({"request": text, "functions": FUNCTIONS,
                       "call": json.dumps([{"name": "get_weather", "arguments": args}])})
  return rows


def write(name, rows, n_val, seed):
  """Shuffles the distinct rows and holds out n_val of them: no validation prompt is in train."""
  order = np.random.default_rng(seed).permutation(len(rows))
  rows = [{"id": int(i), **rows[i]} for i in order]
  for split, part in (("train", rows[n_val:]), ("validation", rows[:n_val])):
    (HERE / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
  write("convert", convert_rows(), 100, 0)
  write("weather", weather_rows(), 100, 1)
