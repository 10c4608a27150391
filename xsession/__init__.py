"""XenUbuntu session manager: restores fully booted flavours from a live medium."""

__version__ = "0.1.0"
