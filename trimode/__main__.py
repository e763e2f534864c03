from trimode.cli import main

raise SystemExit(main())
