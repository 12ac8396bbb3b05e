from disback.cli import main

raise SystemExit(main())
