from chainrelay.cli import main

raise SystemExit(main())
