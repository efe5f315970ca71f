"""hpframe's entry point from a checkout: ``python launch.py [recipe=NAME] [key=value ...]``.

The same as the ``hpframe`` console script of an installed copy (see hpframe/cli.py): composes the
Hydra configuration (schema + hpframe/conf/ + hpframe/recipes/ + overrides), converts it to a typed
RunConfig and runs it. User errors print one clear message and exit with code 2, without a traceback.
"""

from hpframe.cli import main

if __name__ == "__main__":
    main()
