"""qkv's tools: the command line (:mod:`.cli`) and what it runs — ``bench``, ``check``, ``demo``, ``show``
(:mod:`.viz`), ``info``. The library never imports this package."""
