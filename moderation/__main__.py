"""`python -m moderation`: the same as the `moderation` command."""

from moderation.cli import main

if __name__ == "__main__":
    main()
