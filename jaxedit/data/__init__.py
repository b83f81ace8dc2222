"""Package data read through `importlib.resources` (shipped in the wheel):

- `wikitext2_test_slice.txt`: the first 79 lines of the WikiText-2 raw test split, the default
  perplexity text of `jaxedit.eval.general` (CC BY-SA 3.0; source and attribution in
  `WIKITEXT_LICENSE.txt` beside it).
"""
