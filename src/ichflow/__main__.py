"""``python -m ichflow <entry> [--name value ...]``: the same as the ``ichflow`` console script."""

from ichflow.entrypoints import main

if __name__ == "__main__":
    main()
