from distillzoo.cli import main

raise SystemExit(main())
